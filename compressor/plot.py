"""Optional PNG of a run: learned ranks per core, and ratio / accuracy per epoch.

matplotlib is an optional extra (``pip install compressor[plot]``); the CLI checks for it
before training so a missing package never costs a finished run.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError
from .files import atomic_write


def check_available() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("--plot needs matplotlib, which is optional: install it with `pip install 'compressor[plot]'` (or `pip install matplotlib`)") from None


def plot_run(report, path: str | Path) -> Path:
    check_available()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_c, ax_l) = plt.subplots(1, 3, figsize=(16, 4.2))
    width = 0.8 / max(1, len(report.layers))
    for i, layer in enumerate(report.layers):
        xs = [k + i * width for k in range(len(layer.final_ranks))]
        ax_r.bar(xs, layer.initial_ranks, width, color="none", edgecolor=f"C{i}", linestyle="--")
        ax_r.bar(xs, layer.final_ranks, width, color=f"C{i}", label=f"{layer.name} (learned)")
    ax_r.set_xlabel("bond (rank between core k and k+1; last = ring closure)")
    ax_r.set_ylabel("rank")
    ax_r.set_title(f"learned ranks ({report.decomp.upper()}, dashed = initial)")
    ax_r.legend(fontsize=8)
    epochs = [e["epoch"] for e in report.epochs]
    ax_c.plot(epochs, [e["ratio"] for e in report.epochs], "o-", color="C0", label="compression ratio")
    ax_c.set_xlabel("epoch")
    ax_c.set_ylabel("ratio (x)", color="C0")
    ax_c.axhline(report.target, color="C0", linestyle=":", linewidth=1)
    ax2 = ax_c.twinx()
    for key, style, label in (("train_accuracy", "s--", "train acc"), ("eval_accuracy", "d-", "test acc")):
        vals = [e.get(key) for e in report.epochs]
        if any(v is not None for v in vals):
            ax2.plot(epochs, [100 * v if v is not None else float("nan") for v in vals], style, color="C3", label=label)
    ax2.set_ylabel("accuracy (%)", color="C3")
    ax2.legend(fontsize=8, loc="lower right")
    ax_c.set_title(f"training: {report.ratio:.1f}x in {report.seconds:.0f} s")
    losses = [e.get("train_loss") for e in report.epochs]
    ax_l.plot(epochs, [v if v is not None else float("nan") for v in losses], "o-", color="C2")
    ax_l.set_xlabel("epoch")
    ax_l.set_ylabel("training loss (task)")
    ax_l.set_title("loss per epoch")
    fig.tight_layout()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return out
