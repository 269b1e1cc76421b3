"""Every published results table, as a pure function of the JSON a benchmark wrote.

The benchmark scripts measure and write JSON; this module turns JSON into the Markdown that
README.md and docs/ show (``render.py`` puts it between the documents' markers, and
``tests/test_rendered.py`` fails when a document and its JSON disagree). Nothing here measures,
times or reads anything but the records it is given, so a figure in a document can always be
traced to the file and the command that made it.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any, Callable, Iterable

from rows import DEFAULT_ROW, row_name, row_of
from compressor.selectors import get_selector, selector_names

SELECTORS = list(selector_names())


# ------------------------------------------------------------------ noise bands
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def verdict(ours: list[float], theirs: list[float], higher_is_better: bool) -> str:
    """``ahead``, ``tie`` or ``behind``: whether the difference of the means exceeds two standard
    errors of that difference (each side's sample variance over its number of seeds). A side with
    one seed has no spread to judge by: the verdict then says so."""
    if len(ours) < 2 or len(theirs) < 2:
        return "one seed: no verdict"
    (a, sa), (b, sb) = mean_std(ours), mean_std(theirs)
    band = 2 * math.sqrt(sa ** 2 / len(ours) + sb ** 2 / len(theirs))
    better = (a - b) if higher_is_better else (b - a)
    if abs(better) <= band:
        return "tie"
    return "ahead" if better > 0 else "behind"


# ------------------------------------------------------------------ LeNet-5 (lenet5.py)
def lenet5_table(module: dict[str, Any], export: dict[str, Any], nolabels: dict[str, Any]) -> str:
    """One row per ``lenet5.py`` run: accuracy against the dense model, ratio counted on the saved
    checkpoint, its size, wall time."""
    rows = _lenet5_rows(module, export, nolabels)
    first = rows[0][0]
    lines = [f"Dense model: {100 * first['dense_accuracy']:.2f} % test accuracy, {first['dense_params']:,} "
             f"parameters ({first['dense_bytes'] / 1e6:.1f} MB). The ratio is counted on the saved checkpoint.", "",
             "| run | test accuracy | ratio | checkpoint | steps | wall time |", "|---|---|---|---|---|---|"]
    for run, what in rows:
        delta = 100 * (run["accuracy"] - run["dense_accuracy"])
        lines.append(f"| {run['decomp'].upper()} {run['target'].rstrip('x')}×, {what} | {100 * run['accuracy']:.2f} % "
                     f"({delta:+.2f}) | {run['ratio_checkpoint']:.2f}× | {run['checkpoint_bytes'] / 1e3:.0f} kB | "
                     f"{run['steps']:,} | {run['seconds']:.0f} s |")
    return "\n".join(lines) + "\n" + _code_note(run for run, _ in rows)


def _lenet5_rows(module: dict[str, Any], export: dict[str, Any], nolabels: dict[str, Any]) -> list[tuple[dict, str]]:
    rows = [(run, "`nn.Module`") for run in module["runs"]]
    rows += [(run, "`torch.export` program") for run in export["runs"]]
    rows += [(run, "inputs only (distilled, no labels)") for run in nolabels["runs"]]
    return sorted(rows, key=lambda rw: -float(rw[0]["target"].rstrip("x")))


def _chosen(run: dict[str, Any]) -> str:
    """What the tool chose for the options left to it, as its report records it."""
    if "chosen" not in run:
        return "not recorded"
    return ", ".join(f"{k} {v}" for k, v in run["chosen"].items()) or "nothing left to choose"


def lenet5_ranks(module: dict[str, Any], export: dict[str, Any], nolabels: dict[str, Any]) -> str:
    """Per ``lenet5.py`` run: the ranks each layer learned (start -> learned, parameters before ->
    after), what the tool chose, and how far the reloaded checkpoint and the ``.pt2`` are from the
    compressed model's logits."""
    rows = _lenet5_rows(module, export, nolabels)
    names = [layer["name"] for layer in rows[0][0]["layers"]]
    lines = ["| run | " + " | ".join(f"{n}: learned ranks (parameters)" for n in names)
             + " | chosen by the tool | max abs logit difference: reload / `.pt2` / `.pt2` batch 1 |",
             "|---|" + "---|" * (len(names) + 2)]
    for run, what in rows:
        cells = []
        for n in names:
            layer = next((l for l in run["layers"] if l["name"] == n), None)
            if layer is None:
                cells.append("n/a")
                continue
            ranks = ",".join(map(str, bond_ranks(layer["final_ranks"], run["decomp"])))
            cells.append(f"({ranks}) ({layer['params_before']:,} → {layer['params_after']:,})")
        diffs = " / ".join(f"{run[k]:.1g}" for k in ("reload_max_abs_diff", "pt2_max_abs_diff", "pt2_batch1_max_abs_diff"))
        lines.append(f"| {run['decomp'].upper()} {run['target'].rstrip('x')}×, {what} | " + " | ".join(cells)
                     + f" | {_chosen(run)} | {diffs} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ selectors on LeNet-5 (frontier.py)
def frontier_summary(runs: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per row and target: the accuracies, ratios and wall times of its seeds, and their means."""
    out: dict[str, dict[str, Any]] = {}
    for r in runs:
        if "error" in r:
            continue
        name = row_name(*row_of(r))
        entry = out.setdefault(f"{name}@{r['target']:g}x", {"selector": r["selector"], "row": name,
                                                            "target": r["target"], "acc": [], "ratio": [],
                                                            "seconds": []})
        entry["acc"].append(r["accuracy"])
        entry["ratio"].append(r["ratio"])
        entry["seconds"].append(r["seconds"])
    for v in out.values():
        v["acc_mean"], v["acc_std"] = mean_std(v["acc"])
        v["ratio_mean"] = statistics.mean(v["ratio"])
        v["seconds_mean"] = statistics.mean(v["seconds"])
    return out


def frontier_row_order(name: str) -> tuple[int, str]:
    """Rows in the selectors' registry order, a selector's variants after its default."""
    base = name.split(" ")[0].rstrip(",")
    return (SELECTORS.index(base) if base in SELECTORS else len(SELECTORS), name)


def frontier_table(result: dict[str, Any]) -> str:
    """Accuracy @ ratio per row and target, mean ± std over the seeds."""
    summ = frontier_summary(result["runs"])
    targets = sorted({v["target"] for v in summ.values()})
    names = sorted({v["row"] for v in summ.values()}, key=frontier_row_order)
    seeds = sorted({len(v["acc"]) for v in summ.values()})
    lines = [f"Dense LeNet-5: {100 * result['dense_accuracy']:.2f}% test accuracy. Fine-tuning budget: "
             f"{result['epochs']} epochs for every selector; {' or '.join(map(str, seeds))} seeds per cell "
             "(mean ± std).", "",
             "| selector | " + " | ".join(f"{t:g}x" for t in targets) + " |", "|---|" + "---|" * len(targets)]
    for s in names:
        cells = []
        for t in targets:
            v = summ.get(f"{s}@{t:g}x")
            if v is None:
                cells.append("n/a")
                continue
            pm = f" ± {100 * v['acc_std']:.2f}" if len(v["acc"]) > 1 else ""
            cells.append(f"{100 * v['acc_mean']:.2f}{pm}% @ {v['ratio_mean']:.1f}x")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + _code_note(result["runs"])


def frontier_verdicts(result: dict[str, Any]) -> str:
    """The tool's default run against the best fixed-rank baseline at each target, with a noise band."""
    summ = frontier_summary(result["runs"])
    ours_name = row_name(*DEFAULT_ROW)
    lines = [f"`{ours_name}` against the best baseline at each target (the ungated selector with the highest "
             "mean); *ahead* or *behind* when the difference of the means exceeds two standard errors, else "
             "*tie*:", "", "| target | tool defaults | best baseline | difference (points) | verdict |",
             "|---|---|---|---|---|"]
    for t in sorted({v["target"] for v in summ.values()}):
        ours = summ.get(f"{ours_name}@{t:g}x")
        baselines = [v for v in summ.values() if v["target"] == t and not get_selector(v["selector"]).gated]
        if ours is None or not baselines:
            continue
        best = max(baselines, key=lambda v: v["acc_mean"])
        lines.append(f"| {t:g}x | {100 * ours['acc_mean']:.2f} % | {best['row']}: {100 * best['acc_mean']:.2f} % | "
                     f"{100 * (ours['acc_mean'] - best['acc_mean']):+.2f} | "
                     f"{verdict(ours['acc'], best['acc'], higher_is_better=True)} |")
    return "\n".join(lines) + "\n"


#: The paper's comparators that run here as selectors (issue 29), each against ``l0``.
COMPARATORS = ("mars", "pstrn")


def frontier_comparators(result: dict[str, Any]) -> str:
    """``l0`` (weights start, no refit) against each comparator selector per target: mean accuracy
    over the seeds, the difference with its verdict, the worst ratio over the target (a run must
    land within 1.05x of it) and the mean wall seconds of a run."""
    summ = frontier_summary(result["runs"])
    base = row_name(DEFAULT_ROW.selector, "weights", False)
    present = [c for c in COMPARATORS if any(v["row"] == c for v in summ.values())]
    lines = [f"`{base}` against {', '.join(f'`{c}`' for c in present)} on the same budget and seeds: accuracy "
             "(mean over the seeds); the difference in points with its verdict for `l0` (*ahead* or *behind* "
             "beyond two standard errors, else *tie*); the largest ratio over the target of any seed; "
             "seconds a run (mean; rows measured in different sessions, so compare loosely):", "",
             "| target | `l0` | " + " | ".join(f"`{c}` | l0 - {c} | worst ratio / target | s a run (l0 / {c})"
                                              for c in present) + " |",
             "|---|---|" + "---|---|---|---|" * len(present)]
    for t in sorted({v["target"] for v in summ.values()}):
        ours = summ.get(f"{base}@{t:g}x")
        if ours is None:
            continue
        cells = [f"{t:g}x", f"{100 * ours['acc_mean']:.2f} %"]
        for c in present:
            v = summ.get(f"{c}@{t:g}x")
            if v is None:
                cells += ["n/a"] * 4
                continue
            cells += [f"{100 * v['acc_mean']:.2f} %",
                      f"{100 * (ours['acc_mean'] - v['acc_mean']):+.2f} ({verdict(ours['acc'], v['acc'], True)})",
                      f"{max(v['ratio']) / t:.3f}", f"{ours['seconds_mean']:.0f} / {v['seconds_mean']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ l0 against MARS (mars_ranks.py)
def mars_ranks_table(result: dict[str, Any]) -> str:
    """``mars_ranks.py``: per fine-tuning budget, each row's test accuracy (mean over the seeds,
    the seeds' range when it is wide) and ratio."""
    rows = list(dict.fromkeys(s["row"] for s in result["summary"]))
    lines = [f"{result['model']} on {result['data']} (dense {100 * result['dense_accuracy']:.1f} %), "
             f"{result['target']:g}x as a {result['decomp']}; test accuracy, mean over the seeds:", "",
             "| fine-tuning | " + " | ".join(f"`{r}`" for r in rows) + " |", "|---|" + "---|" * len(rows)]
    for epochs in result["epochs"]:
        cells = []
        for row in rows:
            s = next(x for x in result["summary"] if x["row"] == row and x["epochs"] == epochs)
            accs = [r["accuracy"] for r in result["runs"] if r["row"] == row and r["epochs"] == epochs]
            spread = (f" ({100 * min(accs):.1f}-{100 * max(accs):.1f})" if max(accs) - min(accs) > 0.05 else "")
            cells.append(f"{100 * s['accuracy']:.1f} %{spread} at {s['ratio']:.1f}x")
        steps = next(r["steps"] for r in result["runs"] if r["epochs"] == epochs)
        lines.append(f"| {epochs} epochs ({steps} steps) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + f"\nCode: `{result['code']}`.\n"


def frontier_refit(result: dict[str, Any]) -> str:
    """Per target: how often the default run chose to refit at the freeze, and what refitting is
    worth there (the weights start always refitted against never refitted, with a noise band)."""
    summ = frontier_summary(result["runs"])
    sel = DEFAULT_ROW.selector
    never, always, ours = row_name(sel, "weights", False), row_name(sel, "weights", True), row_name(*DEFAULT_ROW)
    lines = [f"`{ours}` chooses at the freeze whether to refit; `{never}` never refits, `{always}` always does "
             "(both from the weights). *ahead* or *behind*: refitting against not, beyond two standard errors:", "",
             f"| target | `{ours}` refitted (seeds) | {ours} | {never} | {always} | refit minus no refit (points) "
             "| verdict |", "|---|---|---|---|---|---|---|"]

    def acc(v: dict[str, Any] | None) -> str:
        return "n/a" if v is None else f"{100 * v['acc_mean']:.2f} %"

    for t in sorted({v["target"] for v in summ.values()}):
        d, n, a = (summ.get(f"{name}@{t:g}x") for name in (ours, never, always))
        runs = [r for r in result["runs"] if "error" not in r and row_of(r) == DEFAULT_ROW and r["target"] == t]
        refitted = f"{sum(bool(r.get('refitted')) for r in runs)} of {len(runs)}" if runs else "n/a"
        diff = f"{100 * (a['acc_mean'] - n['acc_mean']):+.2f}" if a and n else "n/a"
        judged = verdict(a["acc"], n["acc"], higher_is_better=True) if a and n else "n/a"
        lines.append(f"| {t:g}x | {refitted} | {acc(d)} | {acc(n)} | {acc(a)} | {diff} | {judged} |")
    return "\n".join(lines) + "\n"


def frontier_layers(result: dict[str, Any], target: float | None = None) -> str:
    """How each row splits the parameters between the layers at ``target`` (default: the mildest),
    mean over the seeds; a layer stored dense counts its dense weight."""
    runs = [r for r in result["runs"] if "error" not in r]
    target = min(r["target"] for r in runs) if target is None else target
    runs = [r for r in runs if r["target"] == target]
    names = [l["name"] for l in runs[0]["layers"]]
    by_row: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        by_row[row_name(*row_of(r))].append(r)
    lines = [f"Parameters each row leaves in each compressed layer at {target:g}x (mean over its seeds):", "",
             "| selector | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for name in sorted(by_row, key=frontier_row_order):
        cells = []
        for n in names:
            counts = [l["params_after"] for r in by_row[name] for l in r["layers"] if l["name"] == n]
            cells.append(f"{statistics.mean(counts):,.0f}" if counts else "n/a")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ SmolLM2 (llm.py)
#: The gate means' learning rate every run used before it became budget-dependent (and before
#: records carried it); a row at this rate keeps its old name.
FIXED_GATE_LR = 0.05


def gate_rate(run: dict[str, Any]) -> float | None:
    """The gate means' learning rate of a gated run (None for an ungated one)."""
    if not get_selector(run["selector"]).gated:
        return None
    return run.get("gate_lr", FIXED_GATE_LR)


def llm_label(run: dict[str, Any]) -> str:
    """A row's name: the selector, its start and every setting that differs from the plain run."""
    if row_of(run) == DEFAULT_ROW:
        name = row_name(*DEFAULT_ROW)
    else:
        name = run["selector"] + (f" ({run['init']} init)" if get_selector(run["selector"]).gated else "")
        name += ", refit" if run.get("refit") else ""
        if gate_rate(run) not in (None, FIXED_GATE_LR):
            name += f", gate lr {gate_rate(run):.2g}"
        if run.get("head_weighted"):  # runs before the tied embedding's start weighed its head side lack the field
            name += ", embedding weighted by its head"
    if run.get("distill_hidden"):
        name += f", + hidden states x{run['distill_hidden']:g}"
    if run.get("gate_fraction") is not None:
        name += f", gates in the first {100 * run['gate_fraction']:g} %"
    if run.get("skip"):
        name += ", " + " and ".join(run["skip"]) + " dense"
    return name + ("" if run["steps"] else ", no fine-tune")


def _llm_order(name: str) -> tuple:
    order = {sel: i for i, sel in enumerate(("l0", "reinforce", "svd-llm", "whitened-svd", "energy", "svd", "uniform"))}
    return ("no fine-tune" in name, order.get(name.split(" ")[0].rstrip(","), 9), name)


def _llm_cell(runs: list[dict[str, Any]]) -> str:
    ppl = [r["perplexity"] for r in runs]
    ratio = statistics.mean(r["ratio"] for r in runs)
    if len(ppl) == 1:
        return f"{ppl[0]:.1f} @ {ratio:.2f}x"
    mean, std = mean_std(ppl)
    return f"{mean:.1f} ± {std:.1f} ({len(ppl)} seeds) @ {ratio:.2f}x"


def llm_header(result: dict[str, Any]) -> str:
    """What every row of an llm.py table shares: the dense model, the held-out set, the budget."""
    fine_tuned = [r for r in result["runs"] if r["steps"]]
    steps = sorted({r["steps"] for r in fine_tuned})
    counted = [r["tokens"] for r in fine_tuned if r.get("code")]
    budget = (f"{' or '.join(map(str, steps))} steps of {result['batch_size']} examples per fine-tuned run"
              + (f" ({statistics.mean(counted):,.0f} real tokens on average, counted)" if counted else ""))
    unigram = (f" A unigram model of the fine-tuning text (no context) scores {result['unigram_perplexity']:.1f}."
               if "unigram_perplexity" in result else "")
    return (f"Dense SmolLM2-135M: held-out perplexity {result['dense_perplexity']:.2f} ({result['held_out']} "
            f"examples of unseen plays, max length {result['max_length']}). Budget: {budget}.{unigram}")


def llm_table(result: dict[str, Any], keep: Callable[[str], bool] = lambda name: True) -> str:
    """Perplexity @ ratio per row (``keep`` picks rows by name) and target; several seeds as mean ± std."""
    runs = result["runs"]
    targets = sorted({r["target"] for r in runs})
    rows: dict[str, dict[float, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if keep(llm_label(r)):
            rows[llm_label(r)][r["target"]].append(r)
    lines = [llm_header(result), "", "| selector | " + " | ".join(f"{t:g}x" for t in targets) + " |",
             "|---|" + "---|" * len(targets)]
    for name, by_target in sorted(rows.items(), key=lambda item: _llm_order(item[0])):
        lines.append(f"| {name} | " + " | ".join(_llm_cell(by_target[t]) if t in by_target else "n/a"
                                                  for t in targets) + " |")
    chosen = [r for by_target in rows.values() for rs in by_target.values() for r in rs]
    return "\n".join(lines) + "\n" + _code_note(chosen)


def llm_verdicts(result: dict[str, Any], baseline: str = "svd-llm") -> str:
    """The tool's default run against ``baseline`` at each target, over the seeds both have."""
    by: dict[tuple[str, float], list[float]] = defaultdict(list)
    for r in result["runs"]:
        by[(llm_label(r), r["target"])].append(r["perplexity"])
    ours = row_name(*DEFAULT_ROW)
    lines = [f"`{ours}` against `{baseline}` (lower perplexity is better); *ahead* or *behind* when the difference "
             "of the means exceeds two standard errors, else *tie*:", "",
             f"| target | {ours} | {baseline} | difference | verdict |", "|---|---|---|---|---|"]
    for t in sorted({r["target"] for r in result["runs"]}):
        a, b = by.get((ours, t)), by.get((baseline, t))
        if not a or not b:
            continue
        (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
        lines.append(f"| {t:g}x | {ma:.1f} ± {sa:.1f} | {mb:.1f} ± {sb:.1f} | {100 * (ma - mb) / mb:+.1f} % | "
                     f"{verdict(a, b, higher_is_better=False)} |")
    return "\n".join(lines) + "\n"


def bond_ranks(ranks: list[int], decomp: str) -> list[int]:
    """The ranks a report shows: a TT's closing bond of 1 is not a rank."""
    return ranks[:-1] if decomp == "tt" and ranks and ranks[-1] == 1 else ranks


def llm_budget_table(run: dict[str, Any], decomp: str) -> str:
    """Where the gates of one l0 run spent the budget, per layer type."""
    frozen = (f"gates frozen at step {run['frozen_at']} of {run['steps']}" if run.get("frozen_at") is not None
              else "freeze step not recorded")
    reached = "forced closing" if run.get("forced") else "the gates"
    lines = [f"{llm_label(run)} at {run['target']:g}x ({run['ratio']:.3f}x; {frozen}; target reached by {reached}):", "",
             "| layer type | layers | tensorization | start rank (mean) | learned rank (mean) | slices closed | "
             "ratio | kept dense |", "|---|---|---|---|---|---|---|---|"]
    for kind, row in run["by_layer_type"].items():
        tz = max(row["tensorizations"], key=row["tensorizations"].get)
        start = statistics.mean(sum(bond_ranks(r, decomp)) for r in row["start_ranks"])
        finals = [sum(bond_ranks(r, decomp)) for r in row["final_ranks"] if r]
        lines.append(f"| {kind} | {row['layers']} | {tz} | {start:.0f} | {statistics.mean(finals) if finals else 0:.0f} "
                     f"| {100 * row['closed_share']:.0f} % | {row['ratio']:.2f}x | {row['kept_dense']} |")
    return "\n".join(lines) + "\n"


def llm_budget_tables(result: dict[str, Any]) -> str:
    """The budget table of every gated run in the file."""
    gated = [r for r in result["runs"] if get_selector(r["selector"]).gated]
    return "\n".join(llm_budget_table(r, result.get("decomp", "tt"))
                     for r in sorted(gated, key=lambda r: (r["target"], llm_label(r), r.get("seed", 0))))


def llm_cli_run(run: dict[str, Any]) -> str:
    """The SmolLM2-135M walk-through with the command-line tool: budget, perplexities, ranks per layer type."""
    b, ppl, start = run["budget"], run["perplexity"], run["start"]
    lines = [f"Budget: {b['steps']} steps, {b['examples']:,} examples, {b['tokens']:,} tokens of distillation "
             f"(calibration {b['calibration_tokens']:,} tokens), max length {b['max_length']}; "
             f"{run['wall_seconds'] / 60:.0f} min wall time, peak memory {run['peak_rss_gib']} GiB ({run['machine']}). "
             f"Target reached by: {run['target_reached_by']}. Held out: {run['held_out']}.", "",
             "| model | ratio | held-out perplexity |", "|---|---|---|",
             f"| dense (float32) | 1.00× | {ppl['dense']:.1f} |",
             f"| gated start, step 0 ({start['whitened_layers']} layers whitened) | {start['ratio']:.2f}× | "
             f"{ppl['step0']:.1f} |",
             f"| result | {run['ratio']:.2f}× | {ppl['result']:.1f} |", "",
             f"Mean cosine of the result's outputs with the dense model's: {run['mean_cosine_with_dense']:.2f}.", "",
             "| layer type | start rank (mean) | learned rank (mean) | learned (min, max) | ratio | kept dense |",
             "|---|---|---|---|---|---|"]
    notes = []
    for kind, v in run["ranks_by_layer_type"].items():
        spread = ", ".join(f"{m} {v['final_' + m]}" for m in ("min", "max") if "final_" + m in v)
        lines.append(f"| {kind} | {v.get('start_mean', v.get('start')):.0f} | {v.get('final_mean', v.get('final')):.0f} "
                     f"| {spread} | {v['ratio']:.2f}x | {v.get('kept_dense', 0)} |")
        if "note" in v:
            notes.append(f"{kind}: {v['note']}.")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def learned_ranks_table(ablation: dict[str, Any], result: dict[str, Any]) -> str:
    """SVD-LLM's truncation at the ranks an l0 run learned, against that l0 run and SVD-LLM's own
    allocation, fine-tuned alike and without fine-tuning; then the share of parameters each keeps
    per layer type."""
    lines = [f"Dense SmolLM2-135M: held-out perplexity {ablation['dense_perplexity']:.2f}.", "",
             "| target | run | fine-tuned | no fine-tune |", "|---|---|---|---|"]
    shares: list[tuple[str, dict[str, Any]]] = []
    for t in sorted({r["target"] for r in ablation["runs"]}):
        source = [r for r in result["runs"] if r["selector"] == "l0" and r.get("skip") == ["embedding"]
                  and not r.get("refit") and r["target"] == t][:1]
        svd_llm = [r for r in result["runs"] if r["selector"] == "svd-llm" and r["target"] == t]
        at_l0 = [r for r in ablation["runs"] if r["target"] == t]
        l0_name = f"`{llm_label(source[0])}`" if source else "l0"
        for name, short, runs in ((f"svd-llm's truncation at the ranks {l0_name} learned", "svd-llm at l0's ranks", at_l0),
                                  ("svd-llm (one share of parameters per layer)", "svd-llm", svd_llm),
                                  (f"{l0_name} (the run the ranks come from)", "l0", source)):
            if not runs:
                continue
            tuned = [r["perplexity"] for r in runs if r["steps"]]
            raw = [r["perplexity"] for r in runs if not r["steps"]]
            lines.append(f"| {t:g}x | {name} | {statistics.mean(tuned):.1f} | " if tuned else f"| {t:g}x | {name} | n/a | ")
            lines[-1] += f"{statistics.mean(raw):.1f} |" if raw else "n/a |"
            shares.append((f"{short} at {t:g}x", runs[0]))
    kinds = list(dict.fromkeys(k for _, r in shares for k in r["by_layer_type"]))
    lines += ["", "Share of each layer type's dense parameters kept:", "",
              "| run | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for name, r in shares:
        cells = []
        for k in kinds:
            row = r["by_layer_type"].get(k)
            cells.append(f"{100 * row['params_after'] / row['params_before']:.0f} %" if row else "dense")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def embedding_counts_table(counts: dict[str, Any]) -> str:
    """Held-out perplexity of SmolLM2-135M with only its tied embedding truncated, per rank and weighting."""
    kinds = list(dict.fromkeys(k.split(" ", 2)[2] for k in counts if k.startswith("rank ")))
    ranks = sorted({int(k.split(" ")[1]) for k in counts if k.startswith("rank ")})
    seen = {k: v for k, v in counts.items() if k.startswith("distinct_")}
    lines = [f"Dense: held-out perplexity {counts['dense']:.1f}. Distinct tokens seen: "
             + ", ".join(f"{v:,} ({k.removeprefix('distinct_').replace('_', ' ')})" for k, v in seen.items()) + ".", "",
             "| rank | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for r in ranks:
        lines.append(f"| {r} | " + " | ".join(f"{counts[f'rank {r} {k}']:,.1f}" if f"rank {r} {k}" in counts else "n/a"
                                            for k in kinds) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ default budget (encoder_budget.py)
def encoder_budget_table(result: dict[str, Any]) -> str:
    """Default runs on the sentence encoder: what the budget planned, what the run spent, the cosine kept."""
    lines = ["| encoder | target | options | budget (set by) | steps taken | stopped by | gate phase | weight phase "
             "| wall time | held-out cosine (mean, min) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        b, ph = r["budget"], r["phases"]
        budget = f"{r['planned_steps']:,} steps ({b['bound']})" if b else f"{r['planned_steps']:,} steps (given)"
        options = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "defaults"
        phase = {k: f"{v['steps']} steps, {v['seconds']:.0f} s" for k, v in ph.items()}
        lines.append(f"| {r['layers']} layers × {r['width']}, {r['dense_params'] / 1e6:.1f}M parameters, "
                     f"{r['train_sentences']} sentences | {r['target']} | {options} | {budget} | {r['steps']:,} | "
                     f"{r['stopped'].replace('_', ' ')} | {phase['gates']} | {phase['weights']} | "
                     f"{r['seconds'] / 60:.1f} min | {r['cosine_mean']:.4f}, {r['cosine_min']:.4f} |")
    threads = {r.get("torch_threads") for r in result["runs"]} - {None}
    where = f" ({', '.join(str(t) for t in sorted(threads))} torch threads)" if threads else ""
    return "\n".join(lines) + f"\n\nWall time of `compress` on this machine{where}.\n" + _code_note(result["runs"])


# ------------------------------------------------------------------ cost (cost.py, cost_transformer.py)
def cost_table(cost: dict[str, Any]) -> str:
    """Time and memory ratios of LeNet-5, dense against TR, medians of interleaved runs."""
    step, infer = cost["train_step_ratio"], cost["inference"]
    # Records from before cost.py took a real gate-phase step priced the task loss's forward and backward only.
    gated_step = ("task loss + λ · penalty, both optimisers, the controller's update" if "slim_source" in cost
                  else "task loss only, no penalty or controller")
    lines = ["| | ratio |", "|---|---|",
             f"| training step, TR vs dense (batch 128) | {step['tr_vs_dense']:.2f}× |",
             f"| training step, gated TR ({gated_step}) vs ungated TR | {step['gated_vs_tr']:.2f}× (paper: 1.5×) |"]
    if "epoch_seconds" in cost:
        e = cost["epoch_seconds"]
        lines.append(f"| full training epoch on Fashion-MNIST, gated TR vs dense | {e['gated_vs_dense']:.2f}× "
                     f"({e['dense']:.1f} s vs {e['gated_tr']:.1f} s) |")
    slim = cost.get("slim_source", "slim 20× TR at energy-allocated ranks")
    for batch in ("256", "1"):
        lines.append(f"| inference, {slim} vs dense, batch {batch} | {infer['batch_' + batch]['slim_vs_dense']:.2f}× |")
    mem = cost["peak_memory_mb"]
    lines.append(f"| peak memory of a training step (dense / TR / gated TR) | {mem['dense']:.0f} / {mem['tr']:.0f} / "
                 f"{mem['gated']:.0f} MB |")
    return "\n".join(lines) + "\n" + _code_note([cost])


def cost_transformer_table(cost: dict[str, Any]) -> str:
    """One training step of a BERT-style encoder, per start, against the dense step."""
    names = {"faithful": "faithful (default when the weights allow it)", "ladder": "ladder, rank 64"}
    lines = ["| start | model at step 0 | TR vs dense | gated TR vs dense | how the linear layers contract |",
             "|---|---|---|---|---|"]
    for start, v in cost["starts"].items():
        paths = ", ".join(f"{n} {p}" for p, n in v["paths"].items() if n)
        lines.append(f"| {names.get(start, start)} | {v['start_ratio']:.2f}× | {v['tr_vs_dense']:.2f}× | "
                     f"{v['gated_vs_dense']:.2f}× | {paths} |")
    return "\n".join(lines) + "\n" + _code_note([cost])


def _code_note(runs: Iterable[dict[str, Any]]) -> str:
    """Which code made the records: every version named, and how many runs predate versioned records."""
    versions: dict[str, int] = defaultdict(int)
    for r in runs:
        versions[r.get("code", "")] += 1
    lines = []
    named = sorted(v for v in versions if v)
    if named:
        lines.append(f"Code: {', '.join(f'`{v}`' for v in named)}.")
    if versions.get(""):
        lines.append(f"{versions['']} run(s) predate versioned records (made before 2026-12-06, when a run stopped "
                     "depending on whether it is evaluated).")
    return "".join(f"\n{line}\n" for line in lines)


# ------------------------------------------------------------------ deployment (deploy.py)
def _dense_run(result: dict[str, Any], quantize: str) -> dict[str, Any] | None:
    return next((r for r in result["runs"] if r["model"] == "dense" and r["quantize"] == quantize), None)


def deploy_line(result: dict[str, Any]) -> Callable[[float], float] | None:
    """Perplexity on the straight line through dense int8 and dense int4 in the plot's axes
    (log file bytes, log perplexity), as a function of file bytes; None without both points."""
    a, b = _dense_run(result, "int8"), _dense_run(result, "int4")
    if a is None or b is None or a["file_bytes"] == b["file_bytes"]:
        return None
    xa, xb = math.log(a["file_bytes"]), math.log(b["file_bytes"])
    ya, yb = math.log(a["perplexity"]), math.log(b["perplexity"])
    return lambda size: math.exp(ya + (yb - ya) * (math.log(size) - xa) / (xb - xa))


def deploy_frontier(result: dict[str, Any], quantize: str = "int8") -> list[dict[str, Any]]:
    """At each byte budget (dense fp32's file over 4, 5, ... 10): the line's perplexity and the best
    slim model in ``quantize`` whose file fits the budget (None when none does), and how far above
    the line it is (negative: below it, the goal)."""
    line, fp32 = deploy_line(result), _dense_run(result, "none")
    ours = [r for r in result["runs"] if r["model"] == "slim" and r["quantize"] == quantize]
    rows = []
    for k in result.get("budgets", range(4, 11)):
        size = fp32["file_bytes"] / k
        fits = [r for r in ours if r["file_bytes"] <= size]
        best = min(fits, key=lambda r: r["perplexity"]) if fits else None
        on_line = line(size) if line is not None else None
        gap = best["perplexity"] / on_line - 1 if best is not None and on_line is not None else None
        rows.append({"times_smaller": k, "budget_bytes": size, "line_perplexity": on_line,
                     "ours_target": best and best["target"], "ours_perplexity": best and best["perplexity"],
                     "above_line": gap})
    return rows


def _deploy_speed(r: dict[str, Any]) -> str:
    s = r.get("speedup_vs_dense", {})
    return (f"{r['decode_tokens_per_s']:.1f} ({s.get('decode', float('nan')):.2f}×) | "
            f"{r['prefill_s']:.2f} s ({s.get('prefill', float('nan')):.2f}×)")


def deploy_table(result: dict[str, Any]) -> str:
    """Every model as deployed: file, perplexity, speed against dense fp32, peak memory; the
    missing ones and why; ours+int8 against the dense int8-int4 line; the LeNet-5 latencies."""
    fp32 = _dense_run(result, "none")["file_bytes"]
    lines = [f"{result['what']}. Held-out perplexity on {result['held_out']} examples (max length "
             f"{result['max_length']}); decode: batch 1, greedy, {result['new_tokens']} new tokens; prefill: "
             f"{result['prefill'][0]}×{result['prefill'][1]} tokens, no cache; medians of {result['repeats']} "
             f"interleaved repeats on {result['machine']['threads']} threads; peak RSS: each model alone in a fresh "
             "process while it decodes and prefills (in brackets: above that process's size after its imports, "
             "before the model)." + _deploy_made(result), "",
             "| model | quantize | form | file | smaller than fp32 | perplexity | decode tokens/s (vs dense) | "
             "prefill (vs dense) | peak RSS |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        name = "dense" if r["model"] == "dense" else f"ours {r['target']:g}×"
        lines.append(f"| {name} | {r['quantize']} | {r['form']} | {r['file_bytes'] / 1e6:.1f} MB | "
                     f"{fp32 / r['file_bytes']:.2f}× | {r['perplexity']:.2f} | {_deploy_speed(r)} | "
                     f"{r['peak_rss_bytes'] / 2**20:.0f} MiB (+{(r['peak_rss_bytes'] - r['baseline_rss_bytes']) / 2**20:.0f}) |")
    lines += [""] + [f"Not measured: {n['what']}: {n['why']}." for n in result.get("not_available", [])]
    lines += ["", _deploy_goals(result), "", *_deploy_frontier_lines(result)]
    if "lenet5" in result:
        lines += ["", *_deploy_lenet5(result["lenet5"])]
    return "\n".join(lines) + "\n" + _code_note([result])


def _deploy_made(result: dict[str, Any]) -> str:
    """How the slim models were made (each target's steps and distillation tokens: ``slim_made``)."""
    made: dict[tuple[int, int], list[str]] = {}
    for m in result.get("slim_made", {}).values():
        if m["quantize"] == "none":
            made.setdefault((m["steps"], round(m["tokens"])), []).append(m["target"].replace("x", "×"))
    if not made:
        return ""
    if len(made) == 1:
        (steps, tokens), = made
        how = f"{steps} steps ({tokens:,} tokens)"
    else:
        how = "; ".join(f"{', '.join(targets)}: {steps} steps ({tokens:,} tokens)"
                        for (steps, tokens), targets in sorted(made.items(), key=lambda item: -item[0][0]))
    return (f" Slim models: `compress` with the tool's defaults, {how} of distillation on the training plays "
            "(batches of 8); the int8 rows are the same models quantized.")


def _deploy_goals(result: dict[str, Any]) -> str:
    runs = [r for r in result["runs"] if r["model"] == "slim" and r["quantize"] == "none" and r["target"] == 1.5]
    auto = next((r for r in runs if r["form"] == "auto"), None)
    shown = auto or (runs[0] if runs else None)
    if shown is None:
        return "No 1.5× slim model was measured."
    s = shown["speedup_vs_dense"]
    form = "auto form" if auto else f"{shown['form']} form (`load` offers no `auto` form yet)"
    return (f"Speed goal (1.5× slim model, {form}, at least 1.2× dense fp32): decode {s['decode']:.2f}×, "
            f"prefill {s['prefill']:.2f}×.")


def _deploy_frontier_lines(result: dict[str, Any]) -> list[str]:
    rows = deploy_frontier(result)
    if not any(r["line_perplexity"] for r in rows):
        return ["No dense int8-int4 line: a dense quantized model is missing."]
    lines = ["Ours+int8 against the line through dense int8 and dense int4 (log bytes, log perplexity): the best "
             "ours+int8 model whose file fits each budget.", "",
             "| budget (smaller than fp32) | bytes | line's perplexity | ours+int8 | above the line |",
             "|---|---|---|---|---|"]
    for r in rows:
        ours = (f"{r['ours_perplexity']:.2f} ({r['ours_target']:g}×)" if r["ours_perplexity"] is not None
                else "none fits")
        gap = f"{100 * r['above_line']:+.1f} %" if r["above_line"] is not None else "n/a"
        lines.append(f"| {r['times_smaller']}× | {r['budget_bytes'] / 1e6:.1f} MB | {r['line_perplexity']:.2f} | "
                     f"{ours} | {gap} |")
    return lines


def _deploy_lenet5(lenet: dict[str, Any]) -> list[str]:
    lines = [f"LeNet-5, slim {lenet['slim']['target']} TR ({lenet['slim']['ratio']:.1f}× fewer parameters, "
             f"{lenet['file_bytes'] / 1e3:.0f} kB) against dense, latency speedup (above 1: the slim one is faster):",
             "", "| form | batch 1 | batch 256 |", "|---|---|---|"]
    for form, v in lenet["forms"].items():
        i = v["inference"]
        lines.append(f"| {form} | {i['batch_1']['speedup_vs_dense']:.2f}× | {i['batch_256']['speedup_vs_dense']:.2f}× |")
    if "dense_direct_kernel" in lenet:  # what the conv kernel choice alone gives a dense model
        i = lenet["dense_direct_kernel"]
        lines.append(f"| dense, its convs on the direct kernel (reference) | {i['batch_1']['speedup_vs_dense']:.2f}× | "
                     f"{i['batch_256']['speedup_vs_dense']:.2f}× |")
    return lines
