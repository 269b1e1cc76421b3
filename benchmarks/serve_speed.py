"""Side by side: decode and prefill of a slim SmolLM2 checkpoint in its served forms against dense fp32.

Issue #28's speed goal in one process, without the rest of ``deploy.py``: every model is loaded
once, then each round runs every model's decode (greedy ``generate()``, batch 1, a 32-token
prompt, exactly 64 new tokens) and prefill (one 8 x 128 forward without a cache) in turn. A
round's ratio is dense's seconds over the model's in that round (paired, so a slow spell of a
shared machine hits both); the figures are the medians of the rounds' ratios with their range.

    OMP_NUM_THREADS=2 python benchmarks/serve_speed.py --rounds 7 --forms auto cores cores-uncached
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import deploy  # noqa: E402
from compressor.checkpoint import read_blueprint, read_metadata, served_budget  # noqa: E402
from compressor.serving import serve_as  # noqa: E402
from compressor.surgery import tn_layers  # noqa: E402

DEFAULT = deploy.CACHE / f"smollm2_1.5x_none_{deploy.DEFAULT_TOKENS}tok_seed0.safetensors"


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slim", type=Path, default=DEFAULT)
    ap.add_argument("--forms", nargs="+", default=["auto", "cores"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    setup = deploy.smollm2_setup(held_out=1)
    models, load_s, chosen = {"dense": setup.dense().eval()}, {}, {}
    for form in args.forms:  # "cores-uncached": the cores with every layer's weight cache off
        start = time.perf_counter()
        models[form] = deploy.load_slim(args.slim, setup.skeleton, "cores")
        if form == "auto":  # what load(form="auto") does, keeping the choice to report it
            models[form], choice = serve_as(models[form], "auto", budget=served_budget(
                read_metadata(args.slim), read_blueprint(args.slim)))
            chosen = {"counts": choice.counts(), "in_model_vs_cores": choice.in_model, "kept_cores": choice.kept_cores}
        load_s[form] = time.perf_counter() - start
        for layer in tn_layers(models[form]).values():
            layer.weight_cache = not form.endswith("-uncached")
    fns = {(name, task): (deploy.decode_fn(m, setup, args.new_tokens) if task == "decode" else deploy.prefill_fn(m, setup))
           for name, m in models.items() for task in ("decode", "prefill")}
    for fn in fns.values():
        fn()  # warm-up: plans, allocations, weight caches
    rounds = []
    for _ in range(args.rounds):
        rounds.append({key: seconds(fn) for key, fn in fns.items()})
    out = {"slim": args.slim.name, "rounds": args.rounds, "load_seconds": load_s, "auto": chosen,
           "layer_classes": {name: deploy.layer_classes(m) for name, m in models.items()}, "speedup": {}}
    for name in args.forms:
        for task in ("decode", "prefill"):
            ratios = sorted(r["dense", task] / r[name, task] for r in rounds)
            out["speedup"][f"{name} {task}"] = {"median": round(statistics.median(ratios), 3),
                                                "min": round(ratios[0], 3), "max": round(ratios[-1], 3)}
    out["dense_seconds"] = {task: round(statistics.median(r["dense", task] for r in rounds), 3)
                            for task in ("decode", "prefill")}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
