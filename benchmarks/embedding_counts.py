"""What weighting SmolLM2's tied embedding by token counts buys, the embedding alone.

The tied embedding / LM head of SmolLM2-135M is replaced by a rank-r truncation and the
held-out perplexity measured, everything else dense: once by the plain SVD of the weight
(what ``--init weights`` starts from), once weighted by how often the calibration text looks
each row up (``--init activations``: ``calibration.whitening`` of the token counts). Both
truncations are ``E V_r V_r^T`` (every row projected onto the kept directions); they differ
only in which directions are kept. Calibration text: the first 64 training examples (the 8
batches of 8 a run calibrates on); held out: the first 64 test examples.

    python benchmarks/embedding_counts.py          # about 5 minutes on 2 cores
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from compressor.calibration import whitening  # noqa: E402
from compressor.hf_folders import load_model_folder, load_tokenizer, perplexity, read_texts, tokenize  # noqa: E402

DATA = HERE / "data"


def main(ranks=(64, 128, 278), calibration_examples: int = 64, held_out: int = 64) -> None:
    folder = DATA / "smollm2"
    model = load_model_folder(folder).eval()
    tokenizer = load_tokenizer(folder)
    calib = tokenize(read_texts(DATA / "shakespeare" / "train.txt")[:calibration_examples], tokenizer, 128)
    test = tokenize(read_texts(DATA / "shakespeare" / "test.txt")[:held_out], tokenizer, 128)
    counts = torch.bincount(calib["input_ids"][calib["attention_mask"].bool()],
                            minlength=model.config.vocab_size).double()
    table = model.get_input_embeddings().weight
    e = table.detach().double().clone()
    rows = {"dense": perplexity(model, test), "distinct_calibration_tokens": int((counts > 0).sum())}
    directions = {"plain": torch.linalg.svd(e, full_matrices=False)[2],
                  "counts": torch.linalg.svd(whitening(counts)[:, None] * e, full_matrices=False)[2]}
    for r in ranks:
        for name, vh in directions.items():
            with torch.no_grad():
                table.copy_((e @ vh[:r].T @ vh[:r]).to(table.dtype))
            rows[f"rank {r} {name}"] = perplexity(model, test)
            print(f"rank {r:4d} {name:6s}: perplexity {rows[f'rank {r} {name}']:.1f} (dense {rows['dense']:.1f})",
                  flush=True)
    with torch.no_grad():
        table.copy_(e.to(table.dtype))
    out = HERE / "results" / "embedding_counts.json"
    out.write_text(json.dumps(rows, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
