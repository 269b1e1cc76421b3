"""How fast each served form is (cores, factors, dense), per layer kind, at batch 1 and 256.

Layers are built at learned ranks from the repository's own runs (random cores: only the shapes
set the time): LeNet-5's conv2, fc1 and fc2 at 20x TR (``results/lenet5_module.json``), and
SmolLM2-135M's layer shapes twice: the matrix layout of the 1.5x CLI run (mean learned rank of
each projection, ``results/smollm2_cli_1.5x.json``) and a balanced tensor-ring layout at rank 32
(what ``--init weights`` builds). Every form is timed on the same input with the library's own
microbenchmark (``serving._interleaved``: one warm-up call each, interleaved rounds, medians),
so the ratios are robust to a busy machine; absolute times are for orientation only. Here each
layer gets more rounds than ``load(form="auto")`` spends (``--rounds``, default 9 to 15).

    OMP_NUM_THREADS=1 python benchmarks/forms.py [--rounds 9] [--out benchmarks/results/forms.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from compressor import serving
from compressor.forms import Group
from compressor.layers import TNConv2d, TNEmbedding, TNLinear

BATCHES = (1, 256)


def _random(layer):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for c in layer.cores:
            c.copy_(torch.randn(c.shape, generator=g) / max(1.0, c.shape[0] * c.shape[1]) ** 0.5)
    return layer.eval()


def layers():
    """(model, layer name, layer, input of batch B) for every benchmarked layer."""
    lenet = [
        ("conv2", TNConv2d(20, 50, 5, (4, 5), (5, 10), [4, 10, 20, 10, 1], "tr", gated=False),
         lambda b: torch.randn(b, 20, 14, 14)),
        ("fc1", TNLinear(1250, 320, (5, 5, 5, 10), (5, 8, 8), [5, 23, 32, 13, 32, 8, 1], "tr", gated=False),
         lambda b: torch.randn(b, 1250)),
        ("fc2", TNLinear(320, 10, (5, 8, 8), (10,), [5, 12, 10, 1], "tr", gated=False),
         lambda b: torch.randn(b, 320)),
    ]
    shapes = {"q_proj": (576, 576, 128), "k_proj": (576, 192, 92), "o_proj": (576, 576, 249),
              "gate_proj": (576, 1536, 298), "down_proj": (1536, 576, 301)}
    matrix = [(name, TNLinear(i, o, (i,), (o,), [r, 1], "tt", bias=False, gated=False),
               (lambda b, i=i: torch.randn(b, i))) for name, (i, o, r) in shapes.items()]
    matrix.append(("embed_tokens", TNEmbedding(49152, 576, (49152,), (576,), [278, 1], "tt", gated=False),
                   lambda b: torch.randint(0, 49152, (b,))))
    balanced = [(name, TNLinear.from_dense(torch.nn.Linear(i, o, bias=False), "tr", 32, gated=False),
                 (lambda b, i=i: torch.randn(b, i))) for name, (i, o, _) in shapes.items()]
    return ([("LeNet-5 20x TR", *row) for row in lenet] + [("SmolLM2 1.5x matrix", *row) for row in matrix]
            + [("SmolLM2 TR rank 32", *row) for row in balanced])


def measure() -> list[dict]:
    rows = []
    for model, name, layer, make in layers():
        group = Group(name, _random(layer))
        made = {form: group.in_form(form)[0] for form in ("cores", "factors", "dense")}
        row = {"model": model, "layer": name, "ranks": layer.ranks,
               "params": {form: group.params(form) for form in made}}
        for b in BATCHES:
            x = make(b)
            row[f"batch {b}"] = serving._interleaved(made, x, serving.wall_clock, {})
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    cells = []
    for b in BATCHES:
        t = row[f"batch {b}"]
        cells.append(f"b{b}: cores {t['cores'] * 1e6:8.0f} us, factors x{t['cores'] / t['factors']:5.2f}, "
                     f"dense x{t['cores'] / t['dense']:5.2f}")
    p = row["params"]
    return (f"{row['model']:20s} {row['layer']:12s} params c/f/d {p['cores']:>9,} {p['factors']:>9,} "
            f"{p['dense']:>10,} | " + " | ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "forms.json")
    parser.add_argument("--rounds", type=int, default=9, help="fewest interleaved rounds per layer and batch")
    args = parser.parse_args()
    serving.MIN_REPEATS, serving.SECONDS_PER_SHAPE = args.rounds, 0.1
    print("speed-ups are the cores form's time / the form's (x2 = twice as fast as the cores)")
    rows = measure()
    meta = {"command": " ".join(["python"] + sys.argv), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "rounds": args.rounds,
            "machine": platform.processor() or platform.machine()}
    args.out.write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
