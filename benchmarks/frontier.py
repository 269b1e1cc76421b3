"""Accuracy vs compression for every rank selector on LeNet-5 / Fashion-MNIST.

Each selector (l0, uniform, energy, svd, whitened-svd, reinforce) is asked for the same
targets with the same fine-tuning budget (epochs) and the same seeds at every target (the
table gives mean ± std). A selector may name its start, ``l0:activations`` (cores fitted to
the layers' outputs on calibration images) against the default ``l0`` (from the weights), and a
gated row may add ``+refit`` (``l0+refit``: the cores start again from the pretrained weights at
the learned ranks when the gates freeze); ``default`` is a run with every choice left to the tool
(``compress(model, loader)``: on LeNet-5 the weights start, refit chosen at the freeze). Writes
``benchmarks/results/frontier.json``, ``frontier.md`` (the README table),
``frontier.png`` (test accuracy vs ratio, the shape of supp. Fig. 3) and
``ranks_l0.png`` (learned ranks per core for l0, the shape of supp. Fig. 1).

    python benchmarks/frontier.py                    # full run (hours on 2 cores)
    python benchmarks/frontier.py --targets 5,10 --selectors l0:activations --merge   # one part
    python benchmarks/frontier.py --quick            # a few minutes: 20x only, a data subset
    python benchmarks/frontier.py --report --add /tmp/part/frontier.json   # a part run elsewhere, merged in
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from compressor import compress, evaluate  # noqa: E402
from compressor.data import TensorLoader, load_fashion_mnist  # noqa: E402
from compressor.errors import CompressorError  # noqa: E402
from compressor.selectors import DEFAULT_SELECTOR, get_selector, selector_names  # noqa: E402
from provenance import code_version  # noqa: E402
from render import blocks_reading, update_documents  # noqa: E402
from rows import parse_row, row_name, row_of  # noqa: E402
from tables import frontier_row_order, frontier_summary, frontier_table  # noqa: E402
from compressor.zoo import lenet5  # noqa: E402

SELECTORS = list(selector_names())
#: The code this process runs, read once: the tree may change while a long grid runs.
CODE = code_version()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20x only, 12k training images, 2 epochs")
    ap.add_argument("--targets", default=None, help="comma list, default 5,10,20,50,100 (quick: 20)")
    ap.add_argument("--selectors", default=",".join(SELECTORS))
    ap.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs, the same for every selector")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per target (quick: 1)")
    ap.add_argument("--decomp", default="tr")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--merge", action="store_true",
                    help="keep the other rows' runs from the existing JSON, replace only these rows' at these targets")
    ap.add_argument("--report", action="store_true", help="only redraw the table and plots from the JSON")
    ap.add_argument("--add", action="append", default=[], metavar="JSON",
                    help="with --report: another frontier JSON (a part run in parallel with its own --out --merge); "
                         "its runs replace this one's at the same rows and targets")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    json_path = out / f"frontier{suffix}.json"
    if args.add and not args.report:
        ap.error("--add goes with --report")
    if args.report:
        result = json.loads(json_path.read_text())
        for part in args.add:
            result = added(result, json.loads(Path(part).read_text()))
        result["summary"] = frontier_summary(result["runs"])
        write_outputs(result, json_path, out, suffix)
        return
    targets = [float(t) for t in (args.targets or ("20" if args.quick else "5,10,20,50,100")).split(",")]
    rows = [parse_row(s) for s in args.selectors.split(",")]
    dense = lenet5()
    dense.load_state_dict(load_file(str(HERE.parent / "examples" / "lenet5.safetensors")))
    dense.eval()
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    if args.quick:
        xtr, ytr = xtr[:12000], ytr[:12000]
    test = TensorLoader(xte, yte, 1000)
    dense_acc = evaluate(dense, test)
    runs = []
    if args.merge and json_path.exists():
        runs = [r for r in json.loads(json_path.read_text())["runs"]
                if row_of(r) not in rows or r["target"] not in targets]
    started = time.perf_counter()
    for seed in range(1 if args.quick else args.seeds):  # seed-major: every cell has a first seed early
        for target in targets:
            for sel, init, refit in rows:
                t0 = time.perf_counter()
                name = row_name(sel, init, refit)
                extra = {"init": init, "refit": refit} if get_selector(sel).gated else {}
                try:
                    res = compress(dense, TensorLoader(xtr, ytr, 128, shuffle=True, seed=seed), args.decomp, target,
                                   eval_loader=test, rank_select=sel, epochs=args.epochs, seed=seed, **extra)
                except CompressorError as exc:
                    print(f"{name:24s} {target:5g}x seed {seed}: not reachable ({exc})", flush=True)
                    runs.append({"selector": sel, "init": init, "refit": refit, "target": target, "seed": seed,
                                 "error": str(exc)})
                    continue
                r = res.report
                run = {"selector": sel, "init": init, "refit": refit, "target": target, "seed": seed, "ratio": r.ratio,
                       "accuracy": r.accuracy,
                       "seconds": time.perf_counter() - t0, "steps": r.steps, "search_steps": r.search_steps,
                       "forced": r.forced,
                       "ratio_before_force": r.ratio_before_force, "refitted": res.history.refitted,
                       "chosen": r.chosen, "code": CODE,
                       "layers": [{"name": l.name, "initial_ranks": l.initial_ranks, "final_ranks": l.final_ranks,
                                   "params_after": l.params_after, "kept_dense": l.kept_dense} for l in r.layers]}
                runs.append(run)
                print(f"{name:24s} {target:5g}x seed {seed}: {100 * r.accuracy:6.2f}% at {r.ratio:6.2f}x "
                      f"({run['seconds']:.0f} s)", flush=True)
                json_path.write_text(json.dumps(_result(args, dense_acc, runs, started), indent=2))
    write_outputs(_result(args, dense_acc, runs, started), json_path, out, suffix)


def added(result: dict, part: dict) -> dict:
    """``result`` with ``part``'s runs in place of its own at the rows and targets ``part`` ran
    (a grid split over processes: each ran with ``--merge`` from the same JSON, so a part holds the
    others' older runs too, and only the cells its own command ran are taken from it)."""
    ran = {(row_of(r), r["target"]) for r in part["runs"] if r.get("code") == part["code"]}
    runs = [r for r in result["runs"] if (row_of(r), r["target"]) not in ran]
    runs += [r for r in part["runs"] if (row_of(r), r["target"]) in ran]
    parts = result.get("parts", []) + [{"command": part["command"], "code": part["code"],
                                        "seconds": part["seconds"], "threads": part["threads"]}]
    return {**result, "runs": runs, "parts": parts}


def write_outputs(result, json_path: Path, out: Path, suffix: str) -> None:
    json_path.write_text(json.dumps(result, indent=2))
    (out / f"frontier{suffix}.md").write_text(frontier_table(result))
    plot(result, out / f"frontier{suffix}.png", out / f"ranks_l0{suffix}.png")
    print(frontier_table(result))
    print("wrote", json_path)
    if not suffix and out.resolve() == (HERE / "results").resolve():  # a part run elsewhere is not published
        for doc in update_documents(blocks_reading("frontier.json")):
            print("rendered", doc)


def _result(args, dense_acc, runs, started):
    return {"command": " ".join(["python"] + sys.argv), "code": CODE, "quick": args.quick, "epochs": args.epochs,
            "decomp": args.decomp, "dense_accuracy": dense_acc, "seconds": time.perf_counter() - started,
            "threads": torch.get_num_threads(), "runs": runs, "summary": frontier_summary(runs)}


def plot(result, frontier_png: Path, ranks_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, s in enumerate(sorted({row_name(*row_of(r)) for r in result["runs"]},
                                 key=frontier_row_order)):
        pts = sorted((summ["ratio_mean"], 100 * summ["acc_mean"]) for summ in result["summary"].values()
                     if summ["row"] == s)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=s, color=f"C{i}", alpha=0.85)
    ax.axhline(100 * result["dense_accuracy"], color="k", linestyle=":", label="dense")
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio (dense params / compressed params)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"LeNet-5 on Fashion-MNIST, {result['epochs']} fine-tuning epochs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(frontier_png, dpi=110)
    plt.close(fig)

    l0 = [r for r in result["runs"] if row_of(r) == (DEFAULT_SELECTOR, "weights", False)
          and "error" not in r and r["seed"] == 0]
    if not l0:
        return
    names = [l["name"] for l in l0[0]["layers"]]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        width = 0.8 / len(l0)
        for i, r in enumerate(sorted(l0, key=lambda r: r["target"])):
            layer = next(l for l in r["layers"] if l["name"] == name)
            ranks = layer["final_ranks"] or [0]
            ax.bar([k + i * width for k in range(len(ranks))], ranks, width, label=f"{r['target']:g}x")
        init = next(l for l in l0[0]["layers"] if l["name"] == name)["initial_ranks"]
        ax.plot(range(len(init)), init, "k_", markersize=14, label="initial (5x run)")
        ax.set_title(name)
        ax.set_xlabel("bond k (between core k and k+1)")
    axes[0][0].set_ylabel("learned rank")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(ranks_png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
