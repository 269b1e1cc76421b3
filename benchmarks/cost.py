"""What compression costs in time and memory, measured side by side in one process.

* training step (batch 128): dense LeNet-5 vs ungated TR vs gated TR at the same ranks
  (the ranks ``compress`` starts from for a 20x target). The dense and ungated steps are
  plain cross-entropy steps; the gated step is a gate-phase step as ``compress`` takes it,
  built from the library's own :class:`~compressor.gate_phase.GatePhase` and
  :class:`~compressor.train.Optimizers`: task loss + λ · size penalty (λ calibrated on the
  first batch), backward, Adam on the weights and Adam on the gate means, the means kept in
  bounds, the controller's update. A gated step that left any of these out would price a
  cheaper step than a user runs;
* inference at batch 1 and 256: dense vs a slim TR model as a user gets it: with
  ``--checkpoint``, that checkpoint; else ``compress(dense, loader, "tr", "20x")`` (the default
  ``l0`` selector) for one epoch on 12,000 Fashion-MNIST training images, saved and loaded back.
  That run is short because only its ranks matter here (they set the inference cost), not
  its accuracy;
* one full training epoch on Fashion-MNIST: dense vs the same gated step (the "2x a dense
  epoch" goal);
* peak memory of a training step, each configuration in a fresh subprocess.

Timings interleave the configurations and report medians, so the *ratios* are robust to
a noisy machine; absolute times are printed for orientation only.

    python benchmarks/cost.py [--checkpoint slim.safetensors] [--no-epoch] [--out PATH]
    python benchmarks/cost.py --report     # only render the README/docs table from cost.json
Writes benchmarks/results/cost.json (and renders the documents) unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import compressor  # noqa: E402
from compressor.config import CompressConfig  # noqa: E402
from compressor.data import TensorLoader, load_fashion_mnist  # noqa: E402
from compressor.gate_phase import GatePhase  # noqa: E402
from compressor.planner import plan  # noqa: E402
from compressor.runspec import begin_run  # noqa: E402
from compressor.selectors import DEFAULT_SELECTOR, get_selector  # noqa: E402
from compressor.surgery import apply, set_training, tn_layers  # noqa: E402
from compressor.train import Optimizers  # noqa: E402
from compressor.zoo import lenet5  # noqa: E402
from provenance import code_version  # noqa: E402
from render import output_arguments, render_from, write_result  # noqa: E402

DEFAULT_OUT = HERE / "results" / "cost.json"
#: The slim model's l0 run: this many training images, one epoch (its ranks are what matter).
SLIM_IMAGES, SLIM_TARGET = 12_000, "20x"


def dense_model():
    from safetensors.torch import load_file

    m = lenet5()
    m.load_state_dict(load_file(str(HERE.parent / "examples" / "lenet5.safetensors")))
    return m


def gated_start(dense, selector=DEFAULT_SELECTOR, target=20.0, example=None, **options):
    """(model, plan, settled options, applied) as ``compress`` builds them before fine-tuning:
    ``dense`` planned, its depth-dependent defaults settled, factorized and gated."""
    config = CompressConfig(target=target, decomp="tr", rank_select=selector, **options)
    chosen = get_selector(selector)
    the_plan = plan(dense, config.plan_options(), example=example)
    settled = config.settled(len(the_plan.layers))
    config = settled.config
    options = config.selector_options()
    starts, _ = chosen.prepare(the_plan, dense, options)
    the_plan = the_plan.leaving_dense(starts.dense)
    applied = apply(dense, the_plan, starts, sigma=config.sigma, seed=config.seed,
                    make_gate=chosen.gate_factory(options, len(the_plan.layers)))
    return applied.model, the_plan, settled, applied


def gated_model(dense, selector=DEFAULT_SELECTOR, target=20.0, example=None, **options):
    """``dense`` factorized and gated as ``compress`` starts it (``options``: more config fields)."""
    return gated_start(dense, selector, target, example, **options)[0]


def ungated(model):
    m = copy.deepcopy(model)
    for layer in tn_layers(m).values():
        layer.gates = None
    return m


class GatedStep:
    """One gate-phase step of ``compress``'s fine-tune (``train.FineTune._step`` while the gates
    move), on a LeNet-5 gated as a 20x run starts it, with the run's own gate phase and optimisers
    (``loader`` sets the schedule the controller plans over, and λ is calibrated on its first batch).

    The controller's decision is taken every step but not acted on: a run would prune once the
    target holds, and these rows price the steps before that. In a default run on Fashion-MNIST
    the plan reaches 20x at 80 % of a 1,641-step gate phase, so a first epoch is all such steps.
    The loop's bookkeeping (the finite check, tallies, progress events) is left out here as it
    is from the plain steps.
    """

    def __init__(self, dense, loader, target=20.0):
        self.model, the_plan, settled, applied = gated_start(dense, target=target)
        spec = begin_run(settled, loader, self.model, the_plan.dense_params, applied.keep_factorized)
        set_training(self.model, True)
        self.phase = GatePhase(self.model, spec, loader, lambda batch: F.cross_entropy(self.model(batch[0]), batch[1]))
        self.phase.start()  # λ calibrated on the first batch, as a run starts
        self.opt = Optimizers(self.model, self.phase.meter.gates(), True, spec)
        self.steps = 0

    def __call__(self, x, y):
        phase, opt = self.phase, self.opt
        opt.zero_grad()
        loss = F.cross_entropy(self.model(x), y) + phase.lam * phase.penalty()
        loss.backward()
        opt.step()  # the weights' Adam and the gate means' Adam
        phase.bound()
        self.steps += 1
        phase.update(self.steps)


def plain_step(model, lr=1e-3):
    """A cross-entropy step with one Adam over every parameter: how a dense or ungated model trains."""
    set_training(model, True)
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def fashion_loader(images=None):
    """Fashion-MNIST training batches of 128, shuffled (the first ``images`` when given)."""
    x, y = load_fashion_mnist("train")
    return TensorLoader(x[:images], y[:images], 128, shuffle=True)


def training_step(kind, dense, loader):
    """``step(x, y)`` of ``kind``: ``dense``, ``tr`` (ungated at the 20x start's ranks) or ``gated``."""
    if kind == "dense":
        return plain_step(copy.deepcopy(dense))
    if kind == "tr":
        return plain_step(ungated(gated_model(dense)))
    return GatedStep(dense, loader)


def slim_model(dense, checkpoint):
    """(slim model, what the table calls it, the l0 run's report or None): ``checkpoint`` loaded
    as a user loads it, else a short l0 run's result saved and loaded back."""
    if checkpoint:
        return compressor.load(checkpoint, base=lenet5), f"slim TR from {Path(checkpoint).name}", None
    result = compressor.compress(dense, fashion_loader(SLIM_IMAGES), "tr", SLIM_TARGET, epochs=1)
    with tempfile.TemporaryDirectory() as tmp:
        path = compressor.save(result, Path(tmp) / "slim.safetensors")
        slim = compressor.load(path, base=lenet5)
    return slim, f"slim {SLIM_TARGET.rstrip('x')}× TR from an l0 run", result.report


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


def epoch_time(step, loader):
    """Seconds for one pass of ``step`` over ``loader``, in its first epoch's order (so that
    every configuration sees the same batches, whatever passes came before)."""
    loader.set_epoch(0)
    t = time.perf_counter()
    for xb, yb in loader:
        step(xb, yb)
    return time.perf_counter() - t


def peak_memory(kind: str) -> float:
    """Peak resident-memory increase (MB) during 20 training steps of ``kind``, in a fresh process.

    A sampler thread reads /proc/self/statm every millisecond: the process's lifetime peak
    (ru_maxrss) is set by importing torch and cannot isolate the training step.
    """
    code = f"""
import os, sys, threading, time
sys.path.insert(0, {str(HERE)!r}); sys.path.insert(0, {str(HERE.parent)!r})
from cost import dense_model, fashion_loader, training_step
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
loader = fashion_loader()
x, y = next(iter(loader))
step = training_step({kind!r}, dense_model(), loader)
before = rss()
peak = [before]
done = [False]
def sample():
    while not done[0]:
        peak[0] = max(peak[0], rss())
        time.sleep(0.001)
t = threading.Thread(target=sample); t.start()
for _ in range(20):
    step(x, y)
done[0] = True; t.join()
print((peak[0] - before) / 2**20)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def measure_steps(dense, loader, repeats: int) -> dict:
    """The three training steps on one batch, interleaved; their medians, ratios and ranks."""
    gated = GatedStep(dense, loader)
    steps = {"dense": plain_step(copy.deepcopy(dense)), "tr": plain_step(ungated(gated.model)), "gated_tr": gated}
    x, y = next(iter(loader))
    t = interleaved({k: (lambda s=s: s(x, y)) for k, s in steps.items()}, repeats, 5)
    ratio = {"tr_vs_dense": t["tr"] / t["dense"], "gated_vs_tr": t["gated_tr"] / t["tr"],
             "gated_vs_dense": t["gated_tr"] / t["dense"]}
    print("train step (batch 128):", {k: f"{1e3 * v:.1f} ms" for k, v in t.items()}, ratio)
    return {"train_step_seconds": t, "train_step_ratio": ratio,
            "train_ranks": {n: l.ranks for n, l in tn_layers(gated.model).items()}}


def measure_inference(dense, slim, repeats: int) -> dict:
    """Dense vs slim forwards at batch 1 and 256 in evaluation mode, interleaved."""
    set_training(slim, False)
    dense = set_training(copy.deepcopy(dense), False)
    infer = {}
    for batch in (1, 256):
        xb = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            t = interleaved({"dense": lambda: dense(xb), "slim_tr": lambda: slim(xb)}, repeats,
                            50 if batch == 1 else 3)
        infer[f"batch_{batch}"] = {"seconds": t, "slim_vs_dense": t["slim_tr"] / t["dense"]}
        print(f"inference batch {batch}:", {k: f"{1e3 * v:.2f} ms" for k, v in t.items()},
              f"slim/dense {t['slim_tr'] / t['dense']:.2f}")
    return infer


def measure_epoch(dense, loader) -> dict:
    """One shuffled epoch of dense plain steps, then one of gated steps over the same batches."""
    d = epoch_time(plain_step(copy.deepcopy(dense)), loader)
    g = epoch_time(GatedStep(dense, loader), loader)
    print(f"full epoch: dense {d:.1f} s, gated TR {g:.1f} s, ratio {g / d:.2f}")
    return {"dense": d, "gated_tr": g, "gated_vs_dense": g / d}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="a slim LeNet-5 checkpoint for the inference timing "
                                                       "(default: a short l0 run's, saved and loaded back)")
    ap.add_argument("--no-epoch", action="store_true", help="skip the full-epoch comparison")
    ap.add_argument("--repeats", type=int, default=25)
    output_arguments(ap, DEFAULT_OUT)
    args = ap.parse_args()
    if args.report:
        return render_from(DEFAULT_OUT.name)
    code = code_version()
    torch.manual_seed(0)

    dense = dense_model()
    loader = fashion_loader()
    result = measure_steps(dense, loader, args.repeats)
    slim, source, report = slim_model(dense, args.checkpoint)
    result["inference"] = measure_inference(dense, slim, args.repeats)
    result["slim_source"] = source
    result["slim_ranks"] = {n: l.ranks for n, l in tn_layers(slim).items()}
    result["slim_params"] = sum(p.numel() for p in slim.parameters())
    if report is not None:
        result["slim_run"] = {"images": SLIM_IMAGES, "epochs": 1, "target": SLIM_TARGET, "ratio": report.ratio,
                              "forced": report.forced, "seconds": report.seconds}
    if not args.no_epoch:
        result["epoch_seconds"] = measure_epoch(dense, loader)
    result["peak_memory_mb"] = {k: peak_memory(k) for k in ("dense", "tr", "gated")}
    print("peak memory increase (MB):", result["peak_memory_mb"])
    result.update(command=" ".join(["python"] + sys.argv), code=code, threads=torch.get_num_threads())
    write_result(result, Path(args.out), DEFAULT_OUT)


if __name__ == "__main__":
    main()
