"""Where LeNet-5's time goes: every stage of the dense model and of the 20x slim one, side by side.

``deploy.py`` times the whole slim LeNet-5 against the dense one (issue #28's goal: batch 1 no
slower, batch 256 at most 0.8x). This splits that time by stage, at batch 1 and 256: each stage
of the dense model (conv1, relu, pool, ...) on the input the dense model gives it, and each
factorized layer of the slim model (``deploy.py``'s cached 20x TR checkpoint) in every form it
has, on the same input. Shared stages (pooling, activations, the conv too small to factorize)
cost both models alike: they bound the whole model's speed-up however fast the factorized layers
get. Then the whole models: dense against the slim one in ``auto``, ``cores`` and ``factors``.
Interleaved rounds, medians; only the ratios mean anything on a shared machine.

    OMP_NUM_THREADS=1 python benchmarks/lenet5_layers.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import compressor  # noqa: E402
from compressor.forms import FORMS, Group  # noqa: E402
from compressor.layers import TNLayer  # noqa: E402
from compressor.zoo import lenet5  # noqa: E402

import cost  # noqa: E402

SLIM = HERE / "data" / "deploy" / f"lenet5_{cost.SLIM_TARGET}_tr.safetensors"
STAGES = ("conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "flatten", "fc1", "relu3", "fc2")


def medians(fns: dict, x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median seconds per call of each fn on ``x``: warm-up calls, then interleaved rounds."""
    inner = 20 if x.shape[0] == 1 else 2
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():
            for _ in range(3):
                f(x)
        for _ in range(rounds):
            for k, f in fns.items():
                start = time.perf_counter()
                for _ in range(inner):
                    f(x)
                times[k].append((time.perf_counter() - start) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def stage_inputs(dense: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each stage of the dense model is given on ``x``."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [getattr(dense, n).register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].clone()))
             for n in STAGES]
    with torch.no_grad():
        dense(x)
    for h in hooks:
        h.remove()
    return seen


def stage_table(dense: torch.nn.Module, slim: torch.nn.Module, batch: int, rounds: int) -> None:
    inputs = stage_inputs(dense, torch.randn(batch, 1, 28, 28))
    total: dict[str, float] = {}
    print(f"batch {batch}: ms per stage; factorized layers also as <form>/dense")
    for name in STAGES:
        fns = {"dense": getattr(dense, name)}
        layer = getattr(slim, name)
        if isinstance(layer, TNLayer):
            fns.update({f: m[0].eval() for f in FORMS if (m := Group(name, layer).in_form(f)) is not None and f != "dense"})
        t = medians(fns, inputs[name], rounds)
        total["dense"] = total.get("dense", 0.0) + t["dense"]
        ratios = "  ".join(f"{f} {1e3 * t[f]:8.3f} ({t[f] / t['dense']:.2f})" for f in fns if f != "dense")
        print(f"  {name:8s} dense {1e3 * t['dense']:8.3f}  {ratios}")
    print(f"  {'sum':8s} dense {1e3 * total['dense']:8.3f}")


def whole(dense: torch.nn.Module, rounds: int) -> None:
    models = {"dense": dense}
    for form in ("auto", "cores", "factors"):
        models[form] = compressor.load(SLIM, base=lenet5, form=form, example=torch.zeros(1, 1, 28, 28)).eval()
    chosen = {n: type(getattr(models["auto"], n)).__name__ for n in ("conv1", "conv2", "fc1", "fc2")}
    print(f"auto serves {chosen}")
    for batch in (1, 256):
        t = medians(models, torch.randn(batch, 1, 28, 28), rounds)
        print(f"whole model, batch {batch}: " + "  ".join(f"{k} {1e3 * v:.3f} ms ({v / t['dense']:.3f})"
                                                     for k, v in t.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds per measurement (default 20)")
    args = ap.parse_args()
    if not SLIM.is_file():
        sys.exit(f"{SLIM} is missing: run benchmarks/deploy.py once to make it")
    dense = cost.dense_model().eval()
    slim = compressor.load(SLIM, base=lenet5).eval()
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    for batch in (256, 1):
        stage_table(dense, slim, batch, args.rounds)
    whole(dense, args.rounds)


if __name__ == "__main__":
    main()
