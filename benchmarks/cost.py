"""What compression costs in time and memory, measured side by side in one process.

* training step (batch 128): dense LeNet-5 vs ungated TR vs gated TR at the same ranks
  (the ranks ``compress`` starts from for a 20x target);
* inference at batch 1 and 256: dense vs the slim TR model (ranks of a 20x checkpoint if
  one is given, else the energy-allocated 20x ranks);
* one full training epoch on Fashion-MNIST: dense vs gated TR (the "2x a dense epoch" goal);
* peak memory of a training step, each configuration in a fresh subprocess.

Timings interleave the configurations and report medians, so the *ratios* are robust to
a noisy machine; absolute times are printed for orientation only.

    python benchmarks/cost.py [--checkpoint slim.safetensors] [--no-epoch]
Writes benchmarks/results/cost.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from compressor.config import CompressConfig  # noqa: E402
from compressor.planner import plan  # noqa: E402
from compressor.surgery import apply, set_training, tn_layers  # noqa: E402
from compressor.checkpoint import load  # noqa: E402
from compressor.selectors import DEFAULT_SELECTOR, get_selector  # noqa: E402
from compressor.zoo import lenet5  # noqa: E402


def dense_model():
    from safetensors.torch import load_file

    m = lenet5()
    m.load_state_dict(load_file(str(HERE.parent / "examples" / "lenet5.safetensors")))
    return m


def gated_model(dense, selector=DEFAULT_SELECTOR, target=20.0, example=None, **options):
    """``dense`` factorized and gated as ``compress`` starts it (``options``: more config fields)."""
    config = CompressConfig(target=target, decomp="tr", rank_select=selector, **options)
    chosen = get_selector(selector)
    the_plan = plan(dense, config.plan_options(), example=example)
    options = config.selector_options()
    starts, _ = chosen.prepare(the_plan, dense, options)
    return apply(dense, the_plan, starts, sigma=config.sigma, seed=config.seed, make_gate=chosen.gate_factory(options)).model


def ungated(model):
    m = copy.deepcopy(model)
    for layer in tn_layers(m).values():
        layer.gates = None
    return m


def slim_model(dense, checkpoint):
    if checkpoint:
        return load(checkpoint, base=lenet5)
    m = gated_model(dense, "energy")
    for layer in tn_layers(m).values():
        layer.prune_()
    return m


def train_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def interleaved(fns: dict, repeats: int, inner: int, warmup: int = 3) -> dict:
    """Median seconds per call of each fn, measured in alternation."""
    times = {k: [] for k in fns}
    for f in fns.values():
        for _ in range(warmup):
            f()
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            for _ in range(inner):
                f()
            times[k].append((time.perf_counter() - t) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def epoch_time(model, x, y, batch=128):
    from compressor.data import TensorLoader

    set_training(model, True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t = time.perf_counter()
    for xb, yb in TensorLoader(x, y, batch, shuffle=True):
        train_step(model, opt, xb, yb)
    return time.perf_counter() - t


def peak_memory(kind: str) -> float:
    """Peak resident-memory increase (MB) during 20 training steps of ``kind``, in a fresh process.

    A sampler thread reads /proc/self/statm every millisecond: the process's lifetime peak
    (ru_maxrss) is set by importing torch and cannot isolate the training step.
    """
    code = f"""
import os, sys, threading, time, torch
sys.path.insert(0, {str(HERE)!r}); sys.path.insert(0, {str(HERE.parent)!r})
from cost import dense_model, gated_model, ungated, train_step
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
m = dense_model()
m = {{'dense': lambda: m, 'tr': lambda: ungated(gated_model(m)), 'gated': lambda: gated_model(m)}}[{kind!r}]()
x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
opt = torch.optim.Adam(m.parameters(), lr=1e-3)
before = rss()
peak = [before]
done = [False]
def sample():
    while not done[0]:
        peak[0] = max(peak[0], rss())
        time.sleep(0.001)
t = threading.Thread(target=sample); t.start()
for _ in range(20):
    train_step(m, opt, x, y)
done[0] = True; t.join()
print((peak[0] - before) / 2**20)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="a slim LeNet-5 checkpoint for the inference timing")
    ap.add_argument("--no-epoch", action="store_true", help="skip the full-epoch comparison")
    ap.add_argument("--repeats", type=int, default=25)
    args = ap.parse_args()
    torch.manual_seed(0)

    dense = dense_model()
    gated = gated_model(dense)
    plain = ungated(gated)
    ranks = {n: l.ranks for n, l in tn_layers(gated).items()}
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    models = {"dense": dense, "tr": plain, "gated_tr": gated}
    opts = {k: torch.optim.Adam(m.parameters(), lr=1e-4) for k, m in models.items()}
    for m in models.values():
        set_training(m, True)
    step = interleaved({k: (lambda k=k: train_step(models[k], opts[k], x, y)) for k in models}, args.repeats, 5)
    result = {
        "train_step_seconds": step,
        "train_step_ratio": {"tr_vs_dense": step["tr"] / step["dense"], "gated_vs_tr": step["gated_tr"] / step["tr"],
                             "gated_vs_dense": step["gated_tr"] / step["dense"]},
        "train_ranks": ranks,
    }
    print("train step (batch 128):", {k: f"{1e3 * v:.1f} ms" for k, v in step.items()}, result["train_step_ratio"])

    slim = slim_model(dense, args.checkpoint)
    set_training(slim, False)
    set_training(dense, False)
    infer = {}
    for batch in (1, 256):
        xb = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            t = interleaved({"dense": lambda: dense(xb), "slim_tr": lambda: slim(xb)}, args.repeats,
                            50 if batch == 1 else 3)
        infer[f"batch_{batch}"] = {"seconds": t, "slim_vs_dense": t["slim_tr"] / t["dense"]}
        print(f"inference batch {batch}:", {k: f"{1e3 * v:.2f} ms" for k, v in t.items()},
              f"slim/dense {t['slim_tr'] / t['dense']:.2f}")
    result["inference"] = infer
    result["slim_ranks"] = {n: l.ranks for n, l in tn_layers(slim).items()}
    result["slim_params"] = sum(p.numel() for p in slim.parameters())

    if not args.no_epoch:
        from compressor.data import load_fashion_mnist

        xtr, ytr = load_fashion_mnist("train")
        d = epoch_time(copy.deepcopy(dense), xtr, ytr)
        g = epoch_time(gated_model(dense), xtr, ytr)
        result["epoch_seconds"] = {"dense": d, "gated_tr": g, "gated_vs_dense": g / d}
        print(f"full epoch: dense {d:.1f} s, gated TR {g:.1f} s, ratio {g / d:.2f}")

    result["peak_memory_mb"] = {k: peak_memory(k) for k in ("dense", "tr", "gated")}
    print("peak memory increase (MB):", result["peak_memory_mb"])
    out = HERE / "results" / "cost.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result["command"] = " ".join(["python"] + sys.argv)
    result["threads"] = torch.get_num_threads()
    out.write_text(json.dumps(result, indent=2))
    print("wrote", out)


if __name__ == "__main__":
    main()
