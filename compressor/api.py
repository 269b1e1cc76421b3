"""``compress(model, loader)``: plan -> gated model -> fine-tune -> prune -> slim model + report.

Everything is validated (options, target reachability, that a batch fits the model)
before the model is copied and changed; the caller's model is never modified.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterable

import torch
from torch import nn

from . import graph
from .config import CompressConfig
from .errors import DataError, ModelError, TargetError, first_line
from .graph import CompressionPlan, as_module, count_params, layer_size, set_training, tn_layers
from .io import META_ATTR
from .batches import run_model, split_batch
from .train import TrainEvent, TrainHistory, finetune

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    name: str
    kind: str
    shape: list[int]
    tensorization: list[list[int]]
    initial_ranks: list[int]
    final_ranks: list[int]
    params_before: int
    params_after: int
    kept_dense: bool = False  # the learned factorization was not smaller than the dense layer


@dataclass
class Report:
    """What happened to the model; ``ratio`` = dense params / compressed params (whole model)."""

    decomp: str
    target: float
    source: str
    dense_params: int
    params: int
    ratio: float
    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    dense_accuracy: float | None = None
    accuracy: float | None = None
    seconds: float = 0.0
    steps: int = 0
    forced: bool = False
    ratio_before_force: float | None = None
    epochs: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CompressResult:
    model: nn.Module
    report: Report
    history: TrainHistory


def evaluate(model: nn.Module, loader: Iterable) -> float:
    """Top-1 accuracy of ``model`` on a loader of ``(x, y)`` batches."""
    was_training = model.training
    set_training(model, False)
    correct = seen = 0
    with torch.no_grad():
        for batch in loader:
            x, y = split_batch(batch)
            if y is None:
                raise DataError("accuracy needs labels: the evaluation loader yields inputs only")
            out = run_model(model, x)
            correct += int((out.argmax(-1) == y).sum())
            seen += y.numel()
    set_training(model, was_training)
    if seen == 0:
        raise DataError("the evaluation loader is empty")
    return correct / seen


def min_params(the_plan: CompressionPlan, decomp: str) -> int:
    """Smallest size reachable: every factorized bond at rank 1, everything else dense."""
    return the_plan.dense_params + sum(min(layer_size(lp, 1, decomp), lp.params_before) - lp.params_before
                                       for lp in the_plan.layers)


RANK_LADDER = (4, 6, 8, 12, 16, 20, 25, 32, 40, 48, 64)


def layer_rank_cap(lp, decomp: str) -> int:
    """Largest ladder rank whose factorization is no bigger than the dense layer.

    Starting bigger than dense only costs time: those parameters would all have to be
    pruned again before the layer saves anything.
    """
    fitting = [r for r in RANK_LADDER if layer_size(lp, r, decomp) <= lp.params_before]
    return fitting[-1] if fitting else RANK_LADDER[0]


def planned_params(the_plan: CompressionPlan, rank: int, decomp: str) -> int:
    """Model size if every planned layer starts at ``rank`` (capped per layer)."""
    total = the_plan.dense_params
    for lp in the_plan.layers:
        r = lp.rank if lp.rank is not None else min(rank, layer_rank_cap(lp, decomp))
        total += layer_size(lp, r, decomp) - lp.params_before
    return total


def choose_ranks(the_plan: CompressionPlan, target: float, decomp: str) -> None:
    """Give every layer without an explicit rank a generous starting rank.

    Generous means: the whole model starts at no more than half the target ratio (the
    gates then choose which half to drop), but no layer starts bigger than it was.
    """
    chosen = RANK_LADDER[-1]
    for r in RANK_LADDER[4:]:  # at least 16
        if the_plan.dense_params / planned_params(the_plan, r, decomp) <= target / 2:
            chosen = r
            break
    for lp in the_plan.layers:
        if lp.rank is None:
            lp.rank = min(chosen, layer_rank_cap(lp, decomp))


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


def check_batch(teacher: nn.Module, loader: Iterable) -> tuple[bool, torch.Tensor]:
    """Run one batch through the original model: does the data fit? Are there labels?"""
    it = iter(loader)
    try:
        batch = next(it)
    except StopIteration:
        raise DataError("the data loader is empty: it yielded no batch") from None
    x, y = split_batch(batch)
    shape = tuple(x.shape) if torch.is_tensor(x) else "?"
    try:
        with torch.no_grad():
            out = run_model(teacher, x)
    except DataError:
        raise
    except Exception as exc:
        msg = first_line(exc, 200)
        raise DataError(f"a batch of shape {shape} does not fit the model; expected {_expected_input(teacher)} ({msg})") from None
    if y is not None:
        if not torch.is_tensor(y) or y.dtype.is_floating_point or y.dim() != 1:
            raise DataError("labels must be a 1-D integer tensor of class indices")
        if y.shape[0] != out.shape[0]:
            raise DataError(f"{y.shape[0]} labels for a batch of {out.shape[0]} inputs")
        if out.dim() != 2:
            raise DataError(f"labels given but the model outputs shape {tuple(out.shape)}, not (batch, classes)")
        if int(y.max()) >= out.shape[1] or int(y.min()) < 0:
            raise DataError(f"label {int(y.max())} is out of range for a model with {out.shape[1]} outputs")
    return y is not None, x


def compress(model: Any, loader: Iterable, decomp: str | None = None, target: Any = None, *,
             config: CompressConfig | None = None, eval_loader: Iterable | None = None,
             callback: Callable[[TrainEvent], None] | None = None, **options: Any) -> CompressResult:
    """Compress ``model`` to at least ``target`` times fewer parameters.

    ``loader`` yields ``(x, y)`` (cross-entropy on the labels) or ``x`` alone (distillation
    from the original model).  ``decomp`` is ``"tr"`` or ``"tt"``; ``target`` like ``"5x"``.
    Any :class:`CompressConfig` field may be passed as a keyword.  ``eval_loader`` (with
    labels) gives the accuracies in the report.  Returns the slim model and a report.
    """
    started = time.perf_counter()
    if config is None:
        kwargs = dict(options)
        if decomp is not None:
            kwargs["decomp"] = decomp
        if target is not None:
            kwargs["target"] = target
        config = CompressConfig(**kwargs)
    elif options or decomp is not None or target is not None:
        overrides = {**options, **({"decomp": decomp} if decomp else {}),
                     **({"target": target} if target is not None else {})}
        config = replace(config, **overrides)
    module = as_module(model)
    the_plan = graph.plan(module, config)
    if not the_plan.layers:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in the_plan.skipped[:4]) or "the model has no Linear, Conv2d or Embedding layer"
        raise ModelError(f"no eligible layer to compress ({reasons})")
    smallest = min_params(the_plan, config.decomp)
    best = the_plan.dense_params / smallest
    if config.target > best:
        raise TargetError(
            f"target {config.target:g}x is more than this model can give: at most {best:.1f}x with every factorized "
            f"bond at rank 1 ({smallest} of {the_plan.dense_params} parameters remain)")
    select_ranks(the_plan, module, config)
    teacher = set_training(copy.deepcopy(module), False)
    has_labels, _ = check_batch(teacher, loader)
    dense_acc = evaluate(teacher, eval_loader) if eval_loader is not None else None

    gated = graph.apply(module, the_plan, config)
    initial = {name: layer.ranks for name, layer in tn_layers(gated).items()}
    use_teacher = teacher if (not has_labels or config.distill > 0) else None
    evaluate_fn = (lambda m: evaluate(m, eval_loader)) if eval_loader is not None else None
    slim, history = finetune(gated, use_teacher, loader, config, the_plan.dense_params, callback, evaluate_fn,
                             keep_factorized=getattr(gated, "_compressor_renamed", ()))

    layers = tn_layers(slim)
    reports = []
    for lp in the_plan.layers:
        tz = [list(lp.tensorization[0]), list(lp.tensorization[1])]
        if lp.name in layers:
            layer = layers[lp.name]
            reports.append(LayerReport(lp.name, lp.kind, list(lp.shape), tz, initial[lp.name], layer.ranks,
                                       lp.params_before, layer.param_count()))
        else:
            reports.append(LayerReport(lp.name, lp.kind, list(lp.shape), tz, initial[lp.name], [],
                                       lp.params_before, lp.params_before, kept_dense=True))
    params = count_params(slim)
    setattr(slim, META_ATTR, {
        "source": the_plan.source,
        "dense_params": the_plan.dense_params,
        "attrs": {lp.name: {"weight_attr": lp.weight_attr, "bias_attr": lp.bias_attr}
                  for lp in the_plan.layers if lp.weight_attr and lp.name in layers},
        "extra": {"decomp": config.decomp, "target": config.target},
    })
    acc = history.epochs[-1]["eval_accuracy"] if history.epochs and eval_loader is not None else None
    if eval_loader is not None and (acc is None or not history.epochs or history.epochs[-1]["step"] != history.steps):
        acc = evaluate(slim, eval_loader)
    report = Report(config.decomp, config.target, the_plan.source, the_plan.dense_params, params,
                    the_plan.dense_params / params, reports,
                    [{"name": s.name, "kind": s.kind, "reason": s.reason} for s in the_plan.skipped],
                    dense_acc, acc, time.perf_counter() - started, history.steps, history.forced,
                    history.ratio_before_force, history.epochs)
    return CompressResult(slim, report, history)


def select_ranks(the_plan: CompressionPlan, module: nn.Module, config: CompressConfig) -> None:
    """Fill in each planned layer's starting ranks according to ``config.rank_select``."""
    from . import selectors

    sel = config.rank_select
    if sel == "svd":
        selectors.svd_layout(the_plan)
        for lp in the_plan.layers:
            lp.decomp = "tt"
    if sel in ("uniform",):
        selectors.uniform_ranks(the_plan, config.target, config.decomp)
    elif sel in ("energy", "svd"):
        selectors.energy_ranks(the_plan, module, config.target, config.decomp)
    elif config.rank is None:
        choose_ranks(the_plan, config.target, config.decomp)
