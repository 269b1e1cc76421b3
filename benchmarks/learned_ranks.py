"""Ablation: is it l0's allocation or its gate phase? SVD-LLM's truncation at l0's learned ranks.

Takes the per-layer ranks an ``l0`` run of ``benchmarks/llm.py`` learned (its record in
``results/llm.json``: ``--skip embedding`` rows, whose embedding stays dense as SVD-LLM's does)
and fits every linear layer the way ``svd-llm`` does (whitened two-factor truncation of the
pretrained weight) at exactly those ranks, with no gates. Fine-tuned on the same budget, this
row against the ``l0`` row measures what the gate phase costs; against ``svd-llm``, what the
allocation is worth. Rows land in ``results/learned_ranks.json`` (same form as llm.json).

    python benchmarks/learned_ranks.py --targets 1.25x                           # no-fine-tune and fine-tuned rows
    python benchmarks/learned_ranks.py --targets 1.25x --no-finetune-rows only   # a minute
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import llm  # noqa: E402
from compressor.selectors import SVDLLMSelector  # noqa: E402

SOURCE = HERE / "results" / "llm.json"


def learned_ranks(target: float) -> dict[str, list[list[int]]]:
    """Per layer type, the learned ranks of the l0 run (embedding dense, no refit) at ``target``."""
    runs = [r for r in json.loads(SOURCE.read_text())["runs"]
            if r["selector"] == "l0" and r.get("skip") == ["embedding"] and not r.get("refit") and r["target"] == target]
    if not runs:
        sys.exit(f"error: {SOURCE} has no l0 run with the embedding dense at {target:g}x; run "
                 f"`python benchmarks/llm.py --targets {target:g}x --runs l0:activations --skip embedding` first")
    return {kind: row["final_ranks"] for kind, row in runs[0]["by_layer_type"].items()}


class AtLearnedRanks(SVDLLMSelector, name="svd-llm@l0"):
    help = "svd-llm's whitened truncation at the ranks an l0 run learned (benchmark ablation)"

    def matrix_ranks(self, the_plan, config) -> dict[str, int]:
        by_type = learned_ranks(config.target)
        seen: dict[str, int] = {}
        ranks = {}
        for lp in the_plan.layers:  # the record lists each type's layers in plan order
            kind = llm.layer_type(lp.name)
            learned = by_type[kind][seen.get(kind, 0)]
            seen[kind] = seen.get(kind, 0) + 1
            ranks[lp.name] = learned[0] if learned else min(lp.shape)  # [] : the layer went back to dense
        return ranks


if __name__ == "__main__":
    if "--out" not in sys.argv:
        sys.argv += ["--out", str(HERE / "results" / "learned_ranks.json")]
    if "--runs" not in sys.argv:
        sys.argv += ["--runs", AtLearnedRanks.name]
    llm.main()
