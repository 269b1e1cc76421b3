"""When torch's direct conv kernel beats oneDNN's: the sweep ``compressor/conv_kernel.py``'s thresholds come from.

On a CPU ``F.conv2d`` goes to oneDNN (mkldnn), which pays a fixed cost per call before any
arithmetic: at batch 1 a LeNet-5 sized conv spends most of its time there. torch's direct kernel
(``thnn_conv2d``: im2col, then one GEMM per sample) has almost none, and loses to oneDNN only once
the arithmetic dominates. This times both, interleaved (medians over rounds), on LeNet-5's convs
(conv1; conv2 dense; conv2's three factor convs in the 20x slim model's ``factors`` form, each on
the input it gets), a few CIFAR-sized 3 x 3 convs and MobileNet/ResNet-sized 1 x 1 ones, over batch
sizes 1-256 and thread counts, and reports each call's multiply-accumulates (MACs) and the ratio
direct / oneDNN. Per window kind (1 x 1 or k x k), the MAC count below which the direct kernel won
or tied on every shape is the threshold.

    python benchmarks/conv_kernels.py [--threads 1 2] [--rounds 9]   # -> results/conv_kernels.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from compressor.conv_kernel import conv_macs  # noqa: E402

from cost import interleaved  # noqa: E402
from provenance import code_version  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "conv_kernels.json"

#: name: (C_in, C_out, kernel, input side, padding).
SHAPES = {
    "lenet5.conv1": (1, 20, 5, 28, 2),
    "lenet5.conv2": (20, 50, 5, 14, 0),
    "lenet5.conv2.1x1_in": (20, 11, 1, 14, 0),
    "lenet5.conv2.5x5_mid": (11, 19, 5, 14, 0),
    "lenet5.conv2.1x1_out": (19, 50, 1, 10, 0),
    "cifar.3to16_3x3": (3, 16, 3, 32, 1),
    "cifar.32to32_3x3": (32, 32, 3, 16, 1),
    "cifar.64to64_3x3": (64, 64, 3, 8, 1),
    "mobilenet.32to64_1x1": (32, 64, 1, 16, 0),
    "resnet.64to256_1x1": (64, 256, 1, 8, 0),
    "resnet.256to64_1x1": (256, 64, 1, 14, 0),
}
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: About how long one timed round of one kernel lasts.
ROUND_SECONDS = 0.004


def kernels(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, padding: int) -> dict:
    k = list(w.shape[2:])
    return {"onednn": lambda: F.conv2d(x, w, b, 1, padding),
            "direct": lambda: torch._C._nn.thnn_conv2d(x, w, k, b, [1, 1], [padding, padding])}


def median_seconds(fns: dict, rounds: int) -> dict[str, float]:
    """Median seconds per call of each fn: a warm-up, then interleaved rounds of a few ms each
    (``cost.interleaved``, with as many calls a round as fill :data:`ROUND_SECONDS`)."""
    start = time.perf_counter()
    for f in fns.values():
        f()
    inner = max(1, int(ROUND_SECONDS / max((time.perf_counter() - start) / len(fns), 1e-7)))
    return interleaved(fns, rounds, inner, warmup=0)


def sweep(threads: int, rounds: int, shapes: list[str]) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    with torch.no_grad():
        for name in shapes:
            c_in, c_out, k, side, pad = SHAPES[name]
            w, b = torch.randn(c_out, c_in, k, k), torch.randn(c_out)
            for batch in BATCHES:
                x = torch.randn(batch, c_in, side, side)
                fns = kernels(x, w, b, pad)
                err = (fns["direct"]() - fns["onednn"]()).abs().max().item()
                t = median_seconds(fns, rounds)
                macs = conv_macs(x.shape, w.shape, (1, 1), (pad, pad))
                rows.append({"threads": threads, "shape": name, "batch": batch, "macs": macs,
                             "onednn_us": 1e6 * t["onednn"], "direct_us": 1e6 * t["direct"],
                             "direct_vs_onednn": t["direct"] / t["onednn"], "max_abs_diff": err})
                r = rows[-1]
                print(f"{threads}t {name:22s} b{batch:<4d} {macs / 1e6:9.2f} MMAC  onednn {r['onednn_us']:9.1f} us"
                      f"  direct {r['direct_us']:9.1f} us  ratio {r['direct_vs_onednn']:.2f}", flush=True)
    return rows


def crossover(rows: list[dict], tie: float = 1.05) -> dict[str, dict[str, float]]:
    """Per thread count and window kind (``1 x 1`` or ``k x k``): the largest MAC count at which the
    direct kernel won or tied (ratio at most ``tie``), and the smallest at which it lost (over ``tie``)."""
    out = {}
    for threads in sorted({r["threads"] for r in rows}):
        for kind in ("1x1", "kxk"):
            mine = [r for r in rows if r["threads"] == threads and ("1x1" in r["shape"]) == (kind == "1x1")]
            won = [r["macs"] for r in mine if r["direct_vs_onednn"] <= tie]
            lost = [r["macs"] for r in mine if r["direct_vs_onednn"] > tie]
            out[f"{threads} threads, {kind}"] = {"largest_win_macs": max(won, default=0),
                                                 "smallest_loss_macs": min(lost, default=0)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), help="default: all")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help=f"the JSON: rows and crossovers (default results/{DEFAULT_OUT.name})")
    args = ap.parse_args()
    rows = [r for t in args.threads for r in sweep(t, args.rounds, args.shapes)]
    cross = crossover(rows)
    for case, c in cross.items():
        print(f"{case}: direct won or tied up to {c['largest_win_macs'] / 1e6:.1f} MMAC, "
              f"lost from {c['smallest_loss_macs'] / 1e6:.1f} MMAC (0: never)")
    args.out.write_text(json.dumps({"command": " ".join(["python"] + sys.argv), "code": code_version(),
                                    "torch": torch.__version__, "rows": rows, "crossover": cross}, indent=1))


if __name__ == "__main__":
    main()
