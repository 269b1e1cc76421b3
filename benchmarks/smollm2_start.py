"""Perplexity of SmolLM2-135M's gated start (step 0), built exactly as the CLI run builds it.

The CLI does not evaluate a model folder during a run; this script rebuilds the start of
`compress benchmarks/data/smollm2 --data benchmarks/data/shakespeare/train.txt --target 1.5x
--init activations --batch-size 8` (same data split, loader order and calibration batches)
and measures its held-out perplexity on the first 256 test examples.
Run `python benchmarks/prepare_smollm2.py` first.
"""

from pathlib import Path

import torch

from compressor import calibration, planner, surgery
from compressor.config import CompressConfig
from compressor.data import TensorLoader
from compressor.plan import count_state
from compressor.surgery import set_training
from compressor.hf_folders import load_model_folder, load_tokenizer, perplexity, read_texts, text_data, tokenize
from compressor.selectors import get_selector

DATA = Path(__file__).resolve().parent / "data"
FOLDER = DATA / "smollm2"


def main(target: str = "1.5x", batch_size: int = 8, held_out: int = 256) -> None:
    model = load_model_folder(FOLDER).eval()
    train, _ = text_data(str(DATA / "shakespeare" / "train.txt"), FOLDER, 128, 0)
    loader = TensorLoader(train, None, batch_size, shuffle=True, seed=0)
    test = tokenize(read_texts(DATA / "shakespeare" / "test.txt")[:held_out], load_tokenizer(FOLDER), 128)
    config = CompressConfig(target=target, init="activations")
    the_plan = planner.plan(model, config.plan_options(), example=next(iter(loader)))  # the CLI's check_batch draws epoch 0
    grams = calibration.input_grams(model, the_plan, loader, config.calibration_batches)  # then epoch 1
    selector = get_selector("l0")
    options = config.selector_options()
    starts, _ = selector.prepare(the_plan, model, options, calibration.start_factors(model, the_plan, grams))
    gated = set_training(surgery.apply(model, the_plan, starts, sigma=config.sigma, seed=config.seed,
                                       make_gate=selector.gate_factory(options)).model, False)
    with torch.no_grad():
        print(f"start {count_state(model) / count_state(gated):.4f}x: perplexity {perplexity(gated, test):.3f} "
              f"(dense {perplexity(model, test):.3f}) on {held_out} held-out examples")


if __name__ == "__main__":
    main()
