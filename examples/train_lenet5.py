"""Train the reference LeNet-5 on Fashion-MNIST and save it in the two forms compressor reads.

Why: the compression examples and benchmarks need a real, dense baseline to shrink.
This writes, next to this script (or --out-dir):

* ``lenet5.safetensors`` - the state dict, with metadata naming the architecture
  (``compressor.zoo:lenet5``) so no pickled code is needed to rebuild it;
* ``lenet5.pt2`` - a ``torch.export`` program of the eval-mode model with a dynamic
  batch dimension (a self-contained model file, architecture included);
* ``lenet5.json`` - test accuracy, the training recipe, per-epoch history and seconds,
  for the README/benchmarks.

Recipe: Adam (lr 1e-3), batch 128, cross-entropy, with the learning rate decayed to zero
by a cosine schedule stepped once per batch over all ``epochs * batches`` steps. The decay
removes the last-epoch wobble of constant-lr Adam, so the saved (final) model is also a
good one. The recipe is recorded in ``lenet5.json`` and in the safetensors metadata.

Every file is written atomically (temp file in the same folder, then ``os.replace``),
so an interrupted run never leaves a half-written model behind.

Usage: python examples/train_lenet5.py [--epochs 8] [--seed 0] [--out-dir DIR] [--data-root DIR]
Fashion-MNIST comes from ``apt-get install dataset-fashion-mnist`` (no download).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
try:
    from compressor.data import TensorLoader, load_fashion_mnist
    from compressor.zoo import lenet5
except ImportError:  # running from a source checkout without installing the package
    sys.path.insert(0, str(HERE.parent))
    from compressor.data import TensorLoader, load_fashion_mnist
    from compressor.zoo import lenet5

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


def atomic_write(path: Path, write) -> None:
    """Call ``write(fileobj)`` on a temp file beside ``path``, fsync, then rename over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; artifacts are shared files
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


LR = 1e-3
BATCH_SIZE = 128
SCHEDULE = "cosine"  # CosineAnnealingLR, eta_min 0, stepped per batch, T_max = all steps


def recipe(epochs: int, seed: int, steps: int) -> dict:
    """The training recipe, as recorded in lenet5.json and the safetensors metadata."""
    return {"optimizer": "Adam", "lr": LR, "lr_schedule": SCHEDULE, "lr_min": 0.0,
            "schedule_steps": steps, "epochs": epochs, "batch_size": BATCH_SIZE,
            "seed": seed, "loss": "cross_entropy"}


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for xb, yb in TensorLoader(x, y, batch_size=batch):
        correct += int((model(xb).argmax(1) == yb).sum())
    return correct / int(y.shape[0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=HERE)
    parser.add_argument("--data-root", type=Path, default=None,
                        help="folder with the Fashion-MNIST IDX files (default: "
                             "$COMPRESSOR_FASHION_MNIST or /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own choice)")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = args.out_dir.expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)

    train_x, train_y = load_fashion_mnist("train", args.data_root)
    test_x, test_y = load_fashion_mnist("test", args.data_root)
    print(f"Fashion-MNIST: {len(train_y)} train / {len(test_y)} test images; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    model = lenet5()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"LeNet5: {n_params:,} parameters")
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    loader = TensorLoader(train_x, train_y, batch_size=BATCH_SIZE, shuffle=True, seed=args.seed)
    # Cosine decay to zero over all steps: a stable last epoch instead of Adam's final wobble.
    total_steps = args.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=0.0)
    train_recipe = recipe(args.epochs, args.seed, total_steps)
    print(f"recipe: Adam lr {LR:g}, batch {BATCH_SIZE}, {args.epochs} epochs, "
          f"cosine decay to 0 over {total_steps} steps")

    history = []
    total_start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        model.train()
        loss_sum, seen = 0.0, 0
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * int(yb.shape[0])
            seen += int(yb.shape[0])
        test_acc = accuracy(model, test_x, test_y)
        seconds = time.perf_counter() - start
        history.append({"epoch": epoch, "train_loss": round(loss_sum / seen, 5),
                        "test_accuracy": round(test_acc, 5), "seconds": round(seconds, 2),
                        "lr_end": float(f"{scheduler.get_last_lr()[0]:.3g}")})
        print(f"epoch {epoch}/{args.epochs}  train loss {loss_sum / seen:.4f}  "
              f"test acc {test_acc:.4f}  lr {scheduler.get_last_lr()[0]:.2e}  {seconds:.1f}s",
              flush=True)
    total_seconds = time.perf_counter() - total_start
    model.eval()
    final_acc = history[-1]["test_accuracy"]

    # 1. state dict + architecture name (safetensors: no pickle, loadable anywhere).
    st_path = out_dir / "lenet5.safetensors"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    metadata = {"arch": "compressor.zoo:lenet5", "dataset": "fashion-mnist",
                "test_accuracy": f"{final_acc:.4f}"}
    metadata.update({k: str(v) for k, v in train_recipe.items()})  # metadata is str -> str
    blob = st_save(state, metadata=metadata)
    atomic_write(st_path, lambda fh: fh.write(blob))

    # 2. torch.export program with a dynamic batch dim. The example input is a *clone*
    #    of 4 test images: a view would serialise the whole 10k-image storage with it.
    pt2_path = out_dir / "lenet5.pt2"
    example = test_x[:4].clone()
    program = torch.export.export(model, (example,),
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    atomic_write(pt2_path, lambda fh: torch.export.save(program, fh))

    # Verify both files reload to the same function (batch of 7: not the traced size).
    probe = test_x[10:17].clone()
    with torch.no_grad():
        want = model(probe)
        got_pt2 = torch.export.load(str(pt2_path)).module()(probe)
        rebuilt = lenet5()
        rebuilt.load_state_dict(st_load(st_path.read_bytes()))
        got_st = rebuilt.eval()(probe)
    torch.testing.assert_close(got_pt2, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_st, want, rtol=0, atol=0)
    diff = float((got_pt2 - want).abs().max())

    # 3. summary for docs / benchmarks.
    json_path = out_dir / "lenet5.json"
    summary = {
        "arch": "compressor.zoo:lenet5",
        "dataset": "fashion-mnist",
        "parameters": n_params,
        "test_accuracy": final_acc,
        "epochs": args.epochs,
        "seed": args.seed,
        "seconds": round(total_seconds, 1),
        "optimizer": f"Adam lr={LR:g}, cosine decay to 0 per step over {total_steps} steps",
        "batch_size": BATCH_SIZE,
        "recipe": train_recipe,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "history": history,
    }
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(json_path, lambda fh: fh.write(text.encode()))

    print(f"final test accuracy {final_acc:.4f} after {args.epochs} epochs, {total_seconds:.1f}s")
    print(f"wrote {st_path} ({st_path.stat().st_size:,} bytes)")
    print(f"wrote {pt2_path} ({pt2_path.stat().st_size:,} bytes; reload max |diff| {diff:.2e} on batch 7)")
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
