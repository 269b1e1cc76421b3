"""Learned ranks of ℓ0 gates against MARS on a two-layer MLP (the shape of supplementary Fig. 1).

The MARS paper's 2FC-Net (784 -> 625 -> ReLU -> 10) is trained dense here on Fashion-MNIST
(the paper's MLP is on MNIST, which the project does not ship), then compressed to one target
by ``l0`` and by ``mars`` (``compressor/mars.py``) with everything else alike: the same start
(``l0``'s faithful start or ladder), the same target controller, budget, seeds and data. A third
row, ``l0`` with the ``count`` penalty (every slice alike, as MARS's prior and the paper's own
sum of Φ(μ/σ)), has MARS's kind of penalty with ℓ0's gates, so the two differences (the masks,
and what a slice costs) can be told apart. Each row runs at two budgets: the frontier's 2 epochs
and 6. For each run it records the learned rank of every bond of every factorized layer, the
ratio, the test accuracy and the seconds, into ``benchmarks/results/mars_ranks.json`` with the
``code`` that made it (``provenance.py``), and draws ``mars_ranks.png``: the learned rank per
bond, mean over seeds with each seed's as a dot, the rows side by side, one budget a line.

    python benchmarks/mars_ranks.py             # 3 rows x 3 seeds x 2 budgets at 20x, ~8 minutes on 2 cores
    python benchmarks/mars_ranks.py --report    # only redraw the PNG from the JSON
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from compressor import compress, evaluate  # noqa: E402
from compressor.data import TensorLoader, load_fashion_mnist  # noqa: E402
from provenance import code_version  # noqa: E402
from render import output_arguments, write_result  # noqa: E402

RESULTS = HERE / "results"
DEFAULT_OUT = RESULTS / "mars_ranks.json"
#: row -> (rank selector, penalty: None for the selector's own), in the plot's order.
ROWS = {"l0": ("l0", None), "l0, count penalty": ("l0", "count"), "mars": ("mars", None)}
LABELS = {"l0": "ours (ℓ0)", "l0, count penalty": "ℓ0, count penalty", "mars": "MARS"}
#: The MARS paper's 2FC-Net widths (784 -> 625 -> 10), and how it is trained dense here.
HIDDEN, DENSE_EPOCHS, DENSE_LR, BATCH = 625, 5, 1e-3, 128


def two_layer_mlp() -> nn.Module:
    return nn.Sequential(OrderedDict(flatten=nn.Flatten(1), fc1=nn.Linear(28 * 28, HIDDEN), relu=nn.ReLU(),
                                     fc2=nn.Linear(HIDDEN, 10)))


def train_dense(x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    """The 2FC-Net trained with Adam for :data:`DENSE_EPOCHS` epochs (seed 0)."""
    torch.manual_seed(0)
    model = two_layer_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=DENSE_LR)
    for _ in range(DENSE_EPOCHS):
        for xb, yb in TensorLoader(x, y, BATCH, shuffle=True, seed=0):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model.eval()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    xtr, ytr = xtr[: args.train_images], ytr[: args.train_images]
    test = TensorLoader(xte, yte, 1000)
    dense = train_dense(xtr, ytr)
    budgets = [int(e) for e in args.epochs.split(",")]
    result: dict[str, Any] = {"model": "2FC-Net 784-625-10", "data": f"Fashion-MNIST, first {len(xtr)} training images",
                              "target": args.target, "epochs": budgets, "decomp": args.decomp,
                              "dense_accuracy": evaluate(dense, test), "code": code_version(), "runs": []}
    for epochs in budgets:
        for seed in range(args.seeds):
            for row in ROWS:
                result["runs"].append(run_row(dense, (xtr, ytr), test, row, epochs, seed, args))
    return result


def run_row(dense: nn.Module, train: tuple[torch.Tensor, torch.Tensor], test: TensorLoader, row: str, epochs: int,
            seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One compression of ``dense`` as ``row`` says, and what it learned."""
    selector, penalty = ROWS[row]
    started = time.perf_counter()
    res = compress(dense, TensorLoader(*train, BATCH, shuffle=True, seed=seed), args.decomp, args.target,
                   eval_loader=test, rank_select=selector, penalty=penalty, epochs=epochs, seed=seed)
    r = res.report
    run = {"row": row, "selector": selector, "penalty": penalty, "epochs": epochs, "seed": seed, "ratio": r.ratio,
           "accuracy": r.accuracy, "forced": r.forced, "ratio_before_force": r.ratio_before_force,
           "steps": r.steps, "seconds": time.perf_counter() - started,
           "layers": [{"name": lay.name, "initial_ranks": lay.initial_ranks, "final_ranks": lay.final_ranks,
                       "kept_dense": lay.kept_dense} for lay in r.layers]}
    print(f"{row:17s} {epochs:2d} epochs seed {seed}: {100 * r.accuracy:6.2f}% at {r.ratio:6.2f}x, ranks "
          f"{[lay.final_ranks for lay in r.layers]} ({run['seconds']:.0f} s)", flush=True)
    return run


def summary(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per budget and row: mean accuracy, ratio and seconds over the seeds, and how many runs were forced."""
    out = []
    for epochs in result["epochs"]:
        for row in ROWS:
            runs = [r for r in result["runs"] if r["row"] == row and r["epochs"] == epochs]
            if runs:
                out.append({"row": row, "epochs": epochs, "seeds": len(runs), "forced": sum(r["forced"] for r in runs),
                            **{key: statistics.mean(r[key] for r in runs) for key in ("accuracy", "ratio", "seconds")}})
    return out


def plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [lay["name"] for lay in result["runs"][0]["layers"]]
    budgets = result["epochs"]
    fig, axes = plt.subplots(len(budgets), len(names), figsize=(4.8 * len(names), 3.6 * len(budgets)), squeeze=False)
    for axes_row, epochs in zip(axes, budgets):
        means = {s["row"]: s for s in result["summary"] if s["epochs"] == epochs}
        for ax, name in zip(axes_row, names):
            _bars(ax, [r for r in result["runs"] if r["epochs"] == epochs], name, means)
            ax.set_title(f"{name}, {epochs} epochs")
        axes_row[0].set_ylabel("learned rank\n(bars: mean over seeds; dots: each seed)")
    for ax in axes[-1]:
        ax.set_xlabel("bond k (between core k and k+1)")
    fig.suptitle(f"{result['model']} on Fashion-MNIST, {result['target']:g}x {result['decomp'].upper()} "
                 f"(dense {100 * result['dense_accuracy']:.1f}%)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    print("wrote", png)


def _bars(ax: Any, runs: list[dict[str, Any]], name: str, means: dict[str, dict[str, Any]]) -> None:
    """Layer ``name``'s learned rank per bond, a group of bars per row, each seed's as a dot."""
    rows = [row for row in ROWS if row in means]
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        per_seed = [next(lay for lay in r["layers"] if lay["name"] == name)["final_ranks"] or [0]
                    for r in runs if r["row"] == row]  # [] : the layer went back to dense
        bonds = range(max(len(ranks) for ranks in per_seed))
        offset = (i - (len(rows) - 1) / 2) * width
        mean = [statistics.mean(ranks[k] for ranks in per_seed if k < len(ranks)) for k in bonds]
        ax.bar([k + offset for k in bonds], mean, width, color=f"C{i}", alpha=0.75,
               label=f"{LABELS[row]}: {100 * means[row]['accuracy']:.1f}% at {means[row]['ratio']:.1f}x")
        for ranks in per_seed:
            ax.plot([k + offset for k in range(len(ranks))], ranks, "k.", markersize=3)
    initial = next(lay for lay in runs[0]["layers"] if lay["name"] == name)["initial_ranks"]
    ax.plot(range(len(initial)), initial, "k_", markersize=14, label="start")
    ax.legend(fontsize=7)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=float, default=20.0)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", default="2,6", help="fine-tuning budgets in epochs (comma list), the same for every row")
    ap.add_argument("--train-images", type=int, default=12000, help="the first N Fashion-MNIST training images")
    ap.add_argument("--decomp", default="tr")
    output_arguments(ap, DEFAULT_OUT)
    args = ap.parse_args()
    out = Path(args.out)
    if args.report:
        result = json.loads(out.read_text())
    else:
        result = measure(args)
        result["summary"] = summary(result)
        write_result(result, out, DEFAULT_OUT)
    plot(result, out.with_suffix(".png"))
    for s in result["summary"]:
        print(f"{s['row']:17s} {s['epochs']:2d} epochs: {100 * s['accuracy']:.2f}% at {s['ratio']:.2f}x "
              f"({s['forced']} of {s['seeds']} forced), {s['seconds']:.0f} s a run")


if __name__ == "__main__":
    main()
