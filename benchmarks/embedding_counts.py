"""What each weighting of SmolLM2's tied embedding buys, the embedding alone.

The tied embedding / LM head of SmolLM2-135M is replaced by a rank-r truncation and the
held-out perplexity measured, everything else dense. Four truncations:

* ``plain``: the SVD of the weight (what ``--init weights`` starts from);
* ``counts``: rows weighted by how often the calibration text looks each one up
  (``calibration.whitening`` of the token counts: an untied embedding's activations start);
* ``head``: columns whitened by the Gram matrix of the LM head's inputs (the final hidden
  states), so the error is measured in the logits the head produces;
* ``counts x head``: both, D E L with D the count weights and L the head whitening (a tied
  embedding's activations start, ``calibration.start_factors``);
* ``counts x head, 800 examples``: the same with the tokens counted on the first 800 training
  examples (100 batches of 8) instead of 64, as a run counts them (``calibration.COUNT_BATCHES``).

Each keeps E L V_r V_r^T L^-1 (L = I without the head): every row is projected onto the kept
directions, which the weighting chooses, so no row needs its count. Calibration text: the
first 64 training examples (the 8 batches of 8 a run calibrates on); held out: the first 64
test examples.

    python benchmarks/embedding_counts.py          # about 8 minutes on 2 cores
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


def head_gram(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Gram matrix of the LM head's inputs (the final hidden states) at the real tokens."""
    mask = inputs["attention_mask"].bool()
    grams = []
    def gram(module: torch.nn.Module, args: tuple) -> None:
        hidden = args[0][mask].double()
        grams.append(hidden.T @ hidden)
    hook = model.get_output_embeddings().register_forward_pre_hook(gram)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    return sum(grams)


def truncate(e: torch.Tensor, r: int, row_weight: torch.Tensor | None, col_factor: torch.Tensor | None) -> torch.Tensor:
    """E L V_r V_r^T L^-1, V_r the top right singular vectors of D E L (D, L = I when None)."""
    whitened = e if col_factor is None else e @ col_factor
    weighted = whitened if row_weight is None else row_weight[:, None] * whitened
    vh = torch.linalg.svd(weighted, full_matrices=False)[2][:r]
    kept = whitened @ vh.T @ vh
    return kept if col_factor is None else torch.linalg.solve_triangular(col_factor, kept, upper=False, left=False)


def main(ranks=(128, 278, 375), calibration_examples: int = 64, counted_examples: int = 800,
         held_out: int = 64) -> None:
    folder = DATA / "smollm2"
    model = load_model_folder(folder).eval()
    tokenizer = load_tokenizer(folder)
    train = read_texts(DATA / "shakespeare" / "train.txt")
    calib = tokenize(train[:calibration_examples], tokenizer, 128)
    counted = tokenize(train[:counted_examples], tokenizer, 128)
    test = tokenize(read_texts(DATA / "shakespeare" / "test.txt")[:held_out], tokenizer, 128)
    def count(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.bincount(batch["input_ids"][batch["attention_mask"].bool()],
                              minlength=model.config.vocab_size).double()
    counts, more_counts = count(calib), count(counted)
    table = model.get_input_embeddings().weight
    e = table.detach().double().clone()
    rows = {"dense": perplexity(model, test), "distinct_calibration_tokens": int((counts > 0).sum()),
            f"distinct_tokens_in_{counted_examples}_examples": int((more_counts > 0).sum())}
    by_counts, head = whitening(counts), whitening(head_gram(model, calib))
    weights = {"plain": (None, None), "counts": (by_counts, None), "head": (None, head),
               "counts x head": (by_counts, head),
               f"counts x head, {counted_examples} examples": (whitening(more_counts), head)}
    for r in ranks:
        for name, (row_weight, col_factor) in weights.items():
            with torch.no_grad():
                table.copy_(truncate(e, r, row_weight, col_factor).to(table.dtype))
            rows[f"rank {r} {name}"] = perplexity(model, test)
            print(f"rank {r:4d} {name:28s}: perplexity {rows[f'rank {r} {name}']:.1f} (dense {rows['dense']:.1f})",
                  flush=True)
    with torch.no_grad():
        table.copy_(e.to(table.dtype))
    out = HERE / "results" / "embedding_counts.json"
    out.write_text(json.dumps(rows, indent=1))
    print("wrote", out)
    from render import blocks_reading, update_documents  # the documents' tables made from this file

    for doc in update_documents(blocks_reading(out.name)):
        print("rendered", doc)


if __name__ == "__main__":
    main()
