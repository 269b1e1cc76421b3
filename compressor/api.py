"""``compress(model, loader)``: plan -> gated model -> fine-tune -> prune -> slim model + report.

Everything is validated (options, target reachability, that a batch fits the model)
before the model is copied and changed; the caller's model is never modified.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from . import calibration, planner
from .config import CompressConfig, Settled
from .distributed import World
from .errors import ConfigError, DataError, ModelError, TargetError, first_line
from .plan import CompressionPlan, Site, Starts, count_params, count_state, min_params
from .quantize import (QUANTIZER, ByteBudget, Quantization, aim, byte_budget, planned_scales, quantize_model,
                       state_bytes)
from .trace import as_module
from .surgery import Applied, apply, evaluation_mode, set_training, tn_layers
from .blueprint import ELEMENT_TARGET, Blueprint
from .selectors import FaithfulStart, Search, get_selector
from .blocks import shared_blocks
from .batches import BatchCheck, ForwardFn, check_labels, describe_inputs, forward, located, require_reiterable, split_batch
from .budget import EARLY_STOP_BATCHES, EARLY_STOP_CHECKS, BatchSize, format_seconds
from .losses import count_correct
from .refit import refit_layers
from .report import LayerReport, Report, history_fields, start_summary
from .resume import load_state, random_state_kept
from .runspec import RunSpec, begin_run, planned_schedule
from .trials import candidate_trial
from .train import TrainEvent, TrainHistory, finetune

log = logging.getLogger(__name__)


@dataclass
class CompressResult:
    model: nn.Module
    report: Report
    history: TrainHistory
    blueprint: Blueprint  # what save writes besides the tensors (no tag is left on the model)
    quantization: Quantization | None = None  # the int8 weights save writes (the model holds their values)


def evaluate(model: nn.Module, loader: Iterable, forward_fn: ForwardFn | None = None) -> float:
    """Top-1 accuracy of ``model`` on a loader of labelled batches (per token for sequences).

    Under several processes each counts its own batches and the counts are summed, so every
    rank gets the accuracy over all of them.

    A side measurement: every submodule is left in the mode it was in, and no random
    generator moves (a ``DataLoader`` draws a base seed per pass), so a run evaluated every
    epoch trains exactly as one never evaluated."""
    correct = seen = 0
    with evaluation_mode(model), random_state_kept(), torch.no_grad():
        for i, batch in enumerate(loader, 1):
            with located(f"evaluation batch {i}"):
                ran = forward(model, batch, forward_fn)
                if ran.labels is None:
                    raise DataError("accuracy needs labels: the evaluation loader yields inputs only")
                check_labels(ran)
            right, counted = count_correct(ran)
            correct, seen = correct + right, seen + counted
    correct, seen = World.current().sum([correct, seen])
    if seen == 0:
        raise DataError("the evaluation loader is empty")
    return correct / seen


@dataclass(frozen=True)
class OutputCheck:
    """What :func:`compare_outputs` saw: how many examples gave NaN/Inf outputs, and against a
    reference the top-1 agreement and the largest difference, over examples finite in both."""

    examples: int
    nonfinite: int
    reference_nonfinite: int = 0
    agreement: float | None = None  # share of examples whose top-1 class is the reference's (2-D outputs)
    max_difference: float | None = None  # None: no example is finite in both


def compare_outputs(model: nn.Module, inputs: Iterable, reference: nn.Module | None = None) -> OutputCheck:
    """Run ``model`` (and ``reference``) on batches of inputs: non-finite outputs are counted, never
    folded into a difference or an agreement as if they were numbers."""
    n = bad = ref_bad = agree = 0
    worst: float | None = None
    with evaluation_mode(model), torch.no_grad():
        for x in inputs:
            a = model(x)
            finite = torch.isfinite(a.reshape(a.shape[0], -1)).all(1)
            n, bad = n + a.shape[0], bad + int((~finite).sum())
            if reference is None:
                continue
            b = reference(x)
            both = finite & torch.isfinite(b.reshape(b.shape[0], -1)).all(1)
            ref_bad += int((~torch.isfinite(b.reshape(b.shape[0], -1)).all(1)).sum())
            if a.dim() == 2:
                agree += int(((a.argmax(-1) == b.argmax(-1)) & both).sum())
            if bool(both.any()):
                worst = max(worst or 0.0, float((a[both] - b[both]).abs().max()))
    if reference is None:
        return OutputCheck(n, bad)
    return OutputCheck(n, bad, ref_bad, agree / n if n else None, worst)


def _expected_input(module: nn.Module) -> str:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            return f"(batch, {m.in_channels}, H, W)"
        if isinstance(m, nn.Linear):
            return f"(..., {m.in_features})"
        if isinstance(m, nn.Embedding):
            return f"integer indices < {m.num_embeddings}"
    for node in getattr(getattr(module, "graph", None), "nodes", []):
        if node.op == "placeholder" and "val" in node.meta and hasattr(node.meta["val"], "shape"):
            dims = ["batch" if not isinstance(d, int) else str(d) for d in node.meta["val"].shape]
            return "(" + ", ".join(dims) + ")"
    return "the model's input shape"


def check_finite(module: nn.Module) -> None:
    """Every floating-point parameter of ``module`` is finite: a NaN or Inf would reach the TT-SVD
    (a raw ``LinAlgError``) or the loss (a wrong diagnosis), so it is named here."""
    for name, p in module.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            bad = int((~torch.isfinite(p)).sum())
            raise ModelError(f"the model's weight {name} holds {bad:,} NaN or infinite values (of {p.numel():,}); "
                             "no layer can be factorized or fine-tuned from them: check how the model was trained "
                             "or saved")


def check_batch(teacher: nn.Module, loader: Iterable,
                forward_fn: ForwardFn | None = None) -> tuple[bool, Any, BatchSize]:
    """Run one batch through the original model: does the data fit? Are there labels? And what
    does a batch hold (samples, real tokens: what the default budget is counted in)? (Every later
    batch is held to its answer as it is trained on: :class:`~compressor.batches.BatchCheck`.)"""
    try:
        batch = next(iter(loader))
    except StopIteration:
        raise DataError("the data loader is empty: it yielded no batch") from None
    try:
        with torch.no_grad():
            ran = forward(teacher, batch, forward_fn)
    except DataError:
        raise
    except Exception as exc:
        inputs = describe_inputs(split_batch(batch)[0]) if forward_fn is None else "given to forward_fn"
        raise DataError(f"a batch {inputs} does not fit the model; expected {_expected_input(teacher)} "
                        f"({first_line(exc, 200)})") from None
    with located("the first batch"):
        BatchCheck()(ran)
    return ran.labels is not None, batch, BatchSize.of(ran)


def compress(model: Any, loader: Iterable, decomp: str | None = None, target: Any = None, *,
             config: CompressConfig | None = None, eval_loader: Iterable | None = None,
             callback: Callable[[TrainEvent], None] | None = None, state_file: str | Path | None = None,
             resume: bool = False, keep_state: bool = False, **options: Any) -> CompressResult:
    """Compress ``model`` to at least ``target`` times fewer parameters.

    ``loader`` yields ``(x, y)`` (cross-entropy on the labels) or ``x`` alone (distillation
    from the original model).  ``decomp`` is ``"tr"`` or ``"tt"``; ``target`` like ``"5x"``.
    Any :class:`CompressConfig` field may be passed as a keyword.  ``eval_loader`` (with
    labels) gives the accuracies in the report.  Returns the slim model and a report.

    ``state_file``: where the run keeps its resumable state (every ``checkpoint_every`` steps,
    on Ctrl-C/SIGTERM raising :class:`~compressor.resume.RunInterrupted`, with ``keep_state`` when
    training ends); ``resume=True`` continues the run saved there (same model, data, options).
    """
    started = time.perf_counter()
    config = _resolve_config(config, decomp, target, options)
    asked = config.target  # in bytes with quantization; the run aims at an element ratio (settled.config.target)
    saved = _resume_state(config, state_file, resume)
    _check_loaders(loader, eval_loader)
    selector = get_selector(config.rank_select)
    loader, eval_loader = _shard(config, selector, loader, eval_loader)
    module = as_module(model)
    device = _run_device(config)
    teacher = _frozen_copy(module, device)
    has_labels, first_batch, batch_size = check_batch(teacher, loader, config.forward_fn)
    # The first batch is what torch.export traces when torch.fx cannot (Hugging Face models).
    example = split_batch(first_batch)[0] if config.forward_fn is None else None
    stage = _stage_reporter(callback)
    the_plan, starts, start, settled, searched = _choose_start(module, teacher, loader, example, config, selector,
                                                               stage, (has_labels, batch_size))
    config = settled.config
    dense_acc = evaluate(teacher, eval_loader, config.forward_fn) if eval_loader is not None else None

    stage("building the factorized model")
    applied = _build(module, the_plan, starts, selector, config)
    if device is not None:
        applied.model.to(device)
    _check_applied(applied.model, first_batch, config.forward_fn)
    initial = {name: layer.ranks for name, layer in tn_layers(applied.model).items()}
    evaluate_fn = (lambda m: evaluate(m, eval_loader, config.forward_fn)) if eval_loader is not None else None
    start_acc = evaluate_fn(applied.model) if evaluate_fn is not None and saved is None else None  # step 0
    refit = _refit(module, the_plan, starts, applied.sites, config)
    spec = begin_run(settled, loader, applied.model, the_plan.dense_params, applied.keep_factorized, state_file,
                     keep_final=keep_state, batch=batch_size, searched=searched)
    stage(budget_line(spec, eval_loader is not None))
    slim, history = finetune(applied.model, teacher if spec.distillation.needs_teacher(has_labels) else None,
                             loader, spec, callback=callback, evaluate=evaluate_fn, refit=refit, resume_state=saved,
                             labelled=has_labels, held_out=eval_loader, started=started)

    layers = tn_layers(slim)
    quantization = _quantized(slim, config.quantize, stage)
    blueprint = Blueprint(the_plan.source, the_plan.dense_params,
                          tuple(s for s in applied.sites.values() if s.in_graph and s.name in layers),
                          config.decomp, asked, {ELEMENT_TARGET: config.target} if quantization is not None else {})
    acc = _final_accuracy(slim, history, eval_loader, config.forward_fn, measure=quantization is not None)
    measured = dict(target=asked, dense_accuracy=dense_acc, accuracy=acc, start=start_summary(start, start_acc),
                    **_sizes(the_plan.dense_params, count_state(slim), quantization, config.target))
    report = _report(the_plan, applied, initial, slim, history, module, spec, measured, started)
    return CompressResult(slim, report, history, blueprint, quantization)


def _quantized(slim: nn.Module, scheme: str, stage: Callable[[str], None]) -> Quantization | None:
    """``slim``'s weights quantized as ``scheme`` asks (None: not at all), the model given their
    dequantized values: what the file will load as is what the run measures and returns."""
    quantization = quantize_model(slim, scheme)
    if quantization is not None:
        stage(f"{scheme}: {len(quantization.tensors)} weights and cores quantized")
        quantization.load_into(slim)
    return quantization


def _sizes(dense: int, elements: int, quantization: Quantization | None, aimed: float) -> dict[str, Any]:
    """The report's byte fields: the slim file's tensor bytes (its int8 values, scales and float32
    rest) against the dense float32 file's, and the element ratio a byte target was aimed at."""
    size, dense_size = state_bytes(elements, quantization), state_bytes(dense, None)
    sizes = dict(bytes=size, dense_bytes=dense_size, bytes_ratio=dense_size / size)
    if quantization is not None:
        sizes.update(quantize=quantization.scheme, quantizer=QUANTIZER, aimed_ratio=aimed)
    return sizes


def _report(the_plan: CompressionPlan, applied: Applied, initial: dict[str, list[int]], slim: nn.Module,
            history: TrainHistory, module: nn.Module, spec: RunSpec, measured: dict[str, Any],
            started: float) -> Report:
    """The run's :class:`Report`: sizes, layers, the fine-tune's history, what ``spec`` chose (and
    the steps a rank search took) and ``measured`` (the target asked, the accuracies, how the start
    went, the bytes); its seconds run from ``started`` to now."""
    settled, params = spec.chosen, count_state(slim)
    config = settled.config
    return Report(
        decomp=config.decomp, source=the_plan.source, dense_params=the_plan.dense_params,
        params=params, ratio=the_plan.dense_params / params,
        layers=_layer_reports(the_plan, applied, initial, tn_layers(slim)),
        skipped=[{"name": s.name, "kind": s.kind, "reason": s.reason} for s in the_plan.skipped],
        seconds=time.perf_counter() - started, search_steps=spec.schedule.searched, **history_fields(history),
        **measured,
        param_ratio=count_params(module) / count_params(slim), chosen=settled.chosen(history.refitted, history.gate_lr))


def budget_line(spec: RunSpec, held_out: bool) -> str:
    """What the run will spend, said before its first step: the steps and what they hold, the
    rule that set them, early stop and the time budget."""
    schedule = spec.schedule
    if schedule.budget is not None:
        line = schedule.budget.describe(schedule.batches_per_epoch, spec.dense_params)
    else:
        line = f"fine-tuning budget: {schedule.epochs} epochs of {schedule.batches_per_epoch} batches (as asked)"
    if schedule.limit == "max_steps":
        line += f", cut to {schedule.total_steps + schedule.searched:,} steps (max_steps)"
    if schedule.searched:
        line += (f"; the rank search trained {schedule.searched:,} of them, the fine-tune trains the other "
                 f"{schedule.total_steps:,}")
    if spec.early_stop is not None:
        data = "evaluation" if held_out else "training"
        line += (f"; early stop: {EARLY_STOP_CHECKS} checks of the loss on {EARLY_STOP_BATCHES} {data} batches, "
                 f"patience {spec.early_stop.patience}, min delta {spec.early_stop.min_delta:g}")
    if spec.time_budget is not None:
        line += f"; time budget {format_seconds(spec.time_budget)}"
    return line


def _check_loaders(loader: Iterable, eval_loader: Iterable | None) -> None:
    """Both loaders can be iterated more than once (an epoch each), checked before any work."""
    require_reiterable(loader)
    if eval_loader is not None:
        require_reiterable(eval_loader, "evaluation loader")


def _frozen_copy(module: nn.Module, device: torch.device | None) -> nn.Module:
    """The original model in evaluation mode, where the run computes: what calibration observes
    and distillation aims at, while ``module`` itself stays untouched for the refit."""
    teacher = set_training(copy.deepcopy(module), False)
    return teacher.to(device) if device is not None else teacher


def _final_accuracy(slim: nn.Module, history: TrainHistory, eval_loader: Iterable | None,
                    forward_fn: ForwardFn | None, measure: bool = False) -> float | None:
    """The slim model's accuracy: the last epoch's, unless steps ran after it or its weights changed
    since (``measure``: quantized), then measured."""
    if eval_loader is None:
        return None
    last = history.epochs[-1] if history.epochs else None
    if not measure and last is not None and last["eval_accuracy"] is not None and last["step"] == history.steps:
        return last["eval_accuracy"]
    return evaluate(slim, eval_loader, forward_fn)


def _shard(config: CompressConfig, selector: Any, loader: Iterable,
           eval_loader: Iterable | None) -> tuple[Iterable, Iterable | None]:
    """This process's share of the data under torchrun (the loaders as given in a single process)."""
    world = World.current()
    if not world.parallel:
        return loader, eval_loader
    if selector.searches:
        raise ConfigError(f"rank selector {config.rank_select!r} trains and scores its candidates in one process: "
                          "under data parallel each rank would search its own shard; run it in one process")
    if selector.gate is not None and selector.gate.score_function:
        raise ConfigError(f"rank selector {config.rank_select!r} samples several forwards per step, which "
                          "data-parallel training cannot average; use l0")
    return world.shard(loader), (world.shard(eval_loader) if eval_loader is not None else None)


def _choose_start(module: nn.Module, teacher: nn.Module, loader: Iterable, example: Any, config: CompressConfig,
                  selector: Any, stage: Callable[[str], None], first: tuple[bool, BatchSize]
                  ) -> tuple[CompressionPlan, Starts, FaithfulStart | None, Settled, int]:
    """Plan the layers, settle the depth-dependent defaults, observe the layers' inputs if the
    selector needs it, and choose how each starts (after checking that the model has the blocks
    hidden-state distillation would match); a selector that searches is given its trials
    (``first``: whether the batches have labels, and what the first holds). Returns the plan
    (without the layers the selector keeps dense), the starts, the faithful start for the report,
    the settled options and the steps the search trained."""
    check_finite(module)  # before calibration and the TT-SVD, which would fail on them without a name
    if config.distill_hidden > 0:
        shared_blocks(module, teacher)  # a model without repeated blocks fails now, not after calibration
    stage("planning which layers to factorize")
    the_plan = planner.plan(module, config.plan_options(), example=example)
    budget = byte_budget(module, the_plan, config.target) if config.quantize != "none" else None
    if budget is not None:  # a target in bytes: the element ratio that meets it with int8 weights
        config = replace(config, target=aim(budget, the_plan, config.decomp, planned_scales(the_plan)))
    _check_reachable(the_plan, config)
    settled = _settle(config, the_plan, stage)
    config = settled.config
    options = config.selector_options()
    whiten = None
    if selector.needs_calibration(options):
        stage(f"calibration: the inputs of {len(the_plan.layers)} layers on {config.calibration_batches} batches")
        grams = calibration.input_grams(teacher, the_plan, loader, config.calibration_batches, config.forward_fn)
        whiten = calibration.start_factors(teacher, the_plan, grams)
    stage(f"choosing the starting layout and ranks of {len(the_plan.layers)} layers ({the_plan.source} plan)")
    search = _search(module, teacher, loader, the_plan, config, selector, first) if selector.searches else None
    extra = {"search": search} if search is not None else {}
    if search is not None:
        stage(f"rank search: {selector.search_steps(search.budget):,} training steps over candidates "
              f"(of a budget of {search.budget:,})")
    starts, start = selector.prepare(the_plan, module, options, whiten, **extra)
    if budget is not None:
        settled, starts, start = _aim_bytes(budget, the_plan, settled, selector, (starts, start),
                                            lambda c: selector.prepare(the_plan, module, c.selector_options(), whiten,
                                                                       **extra))
    searched = selector.search_steps(search.budget) if search is not None else 0
    return the_plan.leaving_dense(starts.dense), starts, start, settled, searched


def _search(module: nn.Module, teacher: nn.Module, loader: Iterable, the_plan: CompressionPlan,
            config: CompressConfig, selector: Any, first: tuple[bool, BatchSize]) -> Search:
    """What a searching selector may spend: the share of the run's budget ``l0``'s gates get
    (``gate_fraction`` of every step the run would train), and the trial that spends it."""
    labelled, batch = first
    with random_state_kept():  # counting a loader's batches may draw from the stream
        total = planned_schedule(config, loader, module, the_plan.dense_params, batch).total_steps
    trial = candidate_trial(module, the_plan, loader, teacher, config, labelled)
    return Search(trial, int(config.gate_fraction * total), config.seed)


def _aim_bytes(budget: ByteBudget, the_plan: CompressionPlan, settled: Settled, selector: Any,
               prepared: tuple[Starts, FaithfulStart | None], prepare: Callable[[CompressConfig], Any]
               ) -> tuple[Settled, Starts, FaithfulStart | None]:
    """A byte target aimed again once the starts are known: their ranks bound the scales the
    planned layers can end with (the first aim estimated them), so the element ratio the run
    aims at can only rise. A gated run's controller takes it from here; a selector whose
    ranks are final chooses them again at the new ratio (twice at most: the scales shrink)."""
    for _ in range(3):
        aimed = aim(budget, the_plan, settled.config.decomp, planned_scales(the_plan, prepared[0]))
        if aimed <= settled.config.target:
            break
        settled = replace(settled, config=replace(settled.config, target=aimed))
        if selector.gated:
            break
        prepared = prepare(settled.config)
    return (settled, *prepared)


def _build(module: nn.Module, the_plan: CompressionPlan, starts: Starts, selector: Any,
           config: CompressConfig) -> Applied:
    """The factorized model, every planned layer built as its start says, with the selector's
    gates on its bonds (none for a selector whose ranks are final)."""
    make_gate = selector.gate_factory(config.selector_options(), len(the_plan.layers))
    return apply(module, the_plan, starts, sigma=config.sigma, seed=config.seed, make_gate=make_gate)


def _refit(source: nn.Module, the_plan: CompressionPlan, starts: Starts, sites: Mapping[str, Site],
           config: CompressConfig) -> Callable[[nn.Module], int] | None:
    """``refit(model) -> layers`` for the freeze: every layer of the pruned model fitted again from
    ``source`` as it started (None when the run never refits)."""
    if config.refit is False:
        return None
    seed = config.seed
    return lambda model: refit_layers(model, source, the_plan, starts, sites, seed)


def _settle(config: CompressConfig, the_plan: CompressionPlan, stage: Callable[[str], None]) -> Settled:
    """``config`` with its depth-dependent defaults made (``CompressConfig.settled``), saying
    which the tool chose, so a user sees why a transformer run calibrates and refits."""
    settled = config.settled(len(the_plan.layers), any(calibration.observable(lp) for lp in the_plan.layers))
    if (line := settled.stage_line()) is not None:
        stage(line)
    return settled


def _run_device(config: CompressConfig) -> torch.device | None:
    """The device ``config`` asks for (None: wherever the model is), checked to exist."""
    if config.device is None:
        return None
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {config.device!r} was asked for but torch sees no CUDA device")
    return device


def _stage_reporter(callback: Callable[[TrainEvent], None] | None) -> Callable[[str], None]:
    """``stage(message)``: one set-up step before fine-tuning, logged and sent to ``callback``
    (which draws nothing from the run's random stream: the budget's line comes after the seed)."""
    def stage(message: str) -> None:
        log.info(message)
        if callback is not None:
            with random_state_kept():
                callback(TrainEvent("stage", 0, 0, 0, message=message))
    return stage


def _resume_state(config: CompressConfig, state_file: str | Path | None, resume: bool) -> dict[str, Any] | None:
    """The saved state to continue from (read and checked before any work), or None."""
    if state_file is None and (resume or config.checkpoint_every):
        raise ConfigError("resume and checkpoint_every need state_file=, the path the run's state is kept in")
    return load_state(state_file) if resume else None


def _check_applied(model: nn.Module, batch: Any, forward_fn: ForwardFn | None) -> None:
    """One batch through the factorized model before any training.

    A weight the forward reads outside its layer, which no trace saw (a module-walk
    fallback), fails here with a clear error instead of a raw one minutes later. Runs in
    evaluation mode, so no gate noise, dropout or BatchNorm statistics are touched.
    """
    try:
        with evaluation_mode(model), torch.no_grad():
            forward(model, batch, forward_fn)
    except Exception as exc:
        raise ModelError(f"the model fails once its layers are factorized ({first_line(exc, 200)}); a layer's "
                         "weight is probably used outside the layer: leave that layer out with filter_fn") from None


def _resolve_config(config: CompressConfig | None, decomp: str | None, target: Any,
                    options: dict[str, Any]) -> CompressConfig:
    """One validated config from ``config=`` and/or keyword options (keywords win)."""
    overrides = {**options, **({"decomp": decomp} if decomp is not None else {}),
                 **({"target": target} if target is not None else {})}
    if config is None:
        return CompressConfig(**overrides)
    return replace(config, **overrides) if overrides else config


def _check_reachable(the_plan: CompressionPlan, config: CompressConfig) -> None:
    """Fail before any work when nothing can be compressed or the target is out of reach."""
    if not the_plan.layers:
        reasons = ("; ".join(f"{s.name}: {s.reason}" for s in the_plan.skipped[:4])
                   or "the model has no Linear, Conv2d or Embedding layer")
        raise ModelError(f"no eligible layer to compress ({reasons})")
    smallest = min_params(the_plan, config.decomp)
    best = the_plan.dense_params / smallest
    if config.target > best:
        raise TargetError(
            f"target {config.target:g}x is more than this model can give: at most {best:.1f}x with every factorized "
            f"bond at rank 1 ({smallest} of {the_plan.dense_params} parameters remain)")


def _layer_reports(the_plan: CompressionPlan, applied: Applied, initial: dict[str, list[int]],
                   layers: dict[str, Any]) -> list[LayerReport]:
    """One row per planned layer, under the name it has in the slim model."""
    reports = []
    for lp in the_plan.layers:
        name = applied.sites[lp.name].name
        tz = [list(lp.tensorization[0]), list(lp.tensorization[1])]
        layer = layers.get(name)
        final, after = ((layer.ranks, layer.param_count() + layer.buffer_count()) if layer is not None
                        else ([], lp.params_before))
        reports.append(LayerReport(name, lp.kind, list(lp.shape), tz, initial[name], final, lp.params_before,
                                   after, kept_dense=layer is None, paired=lp.paired))
    return reports
