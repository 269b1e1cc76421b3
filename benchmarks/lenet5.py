"""LeNet-5 on Fashion-MNIST: compress to each target and check the product's promises.

For every run: dense and compressed test accuracy, whole-model ratio (counted on the saved
checkpoint), learned ranks per layer, wall time; the checkpoint is saved, reloaded with
``load`` and compared logit for logit; the slim ``torch.export`` program too.

    python benchmarks/lenet5.py                      # 20x and 5x from the nn.Module
    python benchmarks/lenet5.py --source export      # the same model given as a .pt2
    python benchmarks/lenet5.py --no-labels --targets 5x   # label-free distillation
    python benchmarks/lenet5.py --targets 20x --tensorizations balanced,mpo --epochs 2 --out /tmp/mpo.json
                                                     # the mpo layout beside the default, one process
Writes benchmarks/results/lenet5_<source>[_nolabels].json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from compressor import compress, evaluate, export_program, load, save  # noqa: E402
from compressor.data import TensorLoader, load_fashion_mnist  # noqa: E402
from compressor.zoo import lenet5  # noqa: E402
from provenance import code_version  # noqa: E402
from render import blocks_reading, update_documents  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="20x,5x")
    ap.add_argument("--decomp", default="tr")
    ap.add_argument("--tensorizations", default="balanced", help="comma list of balanced, mpo: each target in each")
    ap.add_argument("--source", choices=["module", "export"], default="module")
    ap.add_argument("--no-labels", action="store_true", help="loader yields images only (distillation)")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--report", action="store_true", help="only render the README table from the JSON files")
    args = ap.parse_args()
    if args.report:
        return _render()
    code = code_version()

    torch.manual_seed(args.seed)
    dense = lenet5()
    dense.load_state_dict(load_file(str(HERE.parent / "examples" / "lenet5.safetensors")))
    dense.eval()
    model = torch.export.load(str(HERE.parent / "examples" / "lenet5.pt2")) if args.source == "export" else dense
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    train = TensorLoader(xtr, None if args.no_labels else ytr, 128, shuffle=True, seed=args.seed)
    test = TensorLoader(xte, yte, 1000)
    dense_acc = evaluate(dense, test)
    with tempfile.TemporaryDirectory() as tmp:
        dense_file = Path(tmp) / "dense.safetensors"
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(dense_file))
        dense_bytes = dense_file.stat().st_size
        runs = []
        for target, layout in [(t, z) for t in args.targets.split(",") for z in args.tensorizations.split(",")]:
            t0 = time.perf_counter()
            res = compress(model, train, args.decomp, target, eval_loader=test, epochs=args.epochs, seed=args.seed,
                           tensorization=layout)
            seconds = time.perf_counter() - t0
            ckpt = Path(tmp) / f"slim_{target}_{layout}.safetensors"
            save(res, ckpt)
            base = model if args.source == "export" else lenet5
            back = load(ckpt, base=base)
            x = xte[:256]
            with torch.no_grad():
                ref = res.model(x)
                diff_load = float((back(x) - ref).abs().max())
                pt2 = Path(tmp) / f"slim_{target}_{layout}.pt2"
                export_program(res.model, xte[:8], pt2)
                prog = torch.export.load(str(pt2)).module()
                diff_pt2 = float((prog(x) - ref).abs().max())
                diff_pt2_b1 = float((prog(x[:1]) - ref[:1]).abs().max())
            saved_params = sum(t.numel() for t in load_file(str(ckpt)).values())
            r = res.report
            run = {
                "target": target, "decomp": args.decomp, "tensorization": layout, "source": args.source,
                "labels": not args.no_labels,
                "dense_accuracy": dense_acc, "accuracy": r.accuracy, "drop_points": 100 * (dense_acc - r.accuracy),
                "ratio_report": r.ratio, "ratio_checkpoint": r.dense_params / saved_params,
                "dense_params": r.dense_params, "params": saved_params,
                "checkpoint_bytes": ckpt.stat().st_size, "dense_bytes": dense_bytes,
                "size_ratio_bytes": dense_bytes / ckpt.stat().st_size,
                "reload_max_abs_diff": diff_load, "pt2_max_abs_diff": diff_pt2, "pt2_batch1_max_abs_diff": diff_pt2_b1,
                "seconds": seconds, "steps": r.steps, "forced": r.forced, "ratio_before_force": r.ratio_before_force,
                "layers": [{"name": l.name, "tensorization": l.tensorization, "initial_ranks": l.initial_ranks,
                            "final_ranks": l.final_ranks, "params_before": l.params_before,
                            "params_after": l.params_after} for l in r.layers],
                "skipped": r.skipped, "epochs": r.epochs, "chosen": r.chosen, "code": code,
            }
            runs.append(run)
            print(json.dumps({k: v for k, v in run.items() if k not in ("epochs", "layers", "skipped")}), flush=True)
            for l in run["layers"]:
                print("   ", l["name"], l["initial_ranks"], "->", l["final_ranks"], l["params_before"], "->", l["params_after"])
    out = Path(args.out) if args.out else HERE / "results" / f"lenet5_{args.source}{'_nolabels' if args.no_labels else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    # A run replaces the earlier record of its target and decomposition; the other targets' records stay.
    def key(r):
        return r["target"], r["decomp"], r.get("tensorization", "balanced")

    made = {key(r) for r in runs}
    kept = [r for r in json.loads(out.read_text())["runs"] if key(r) not in made] \
        if out.exists() else []
    out.write_text(json.dumps({"command": " ".join(["python"] + sys.argv), "torch_threads": torch.get_num_threads(),
                               "runs": runs + kept}, indent=2))
    print("wrote", out)
    if not args.out:
        _render()


def _render() -> None:
    for doc in update_documents(blocks_reading("lenet5_module.json", "lenet5_export.json", "lenet5_module_nolabels.json")):
        print("rendered", doc)


if __name__ == "__main__":
    main()
