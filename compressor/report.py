"""What a compression run reports: the :class:`Report` and its per-layer rows.

The report is a plain value (``to_dict`` is its JSON): the sizes and ratio, each layer's
ranks before and after, what the start and the fine-tune did, and which options the tool
chose for the run (read from :class:`~compressor.config.Settled`, as the set-up line and
the resume fingerprint are).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .train import TrainHistory


@dataclass
class LayerReport:
    name: str
    kind: str
    shape: list[int]
    tensorization: list[list[int]]
    initial_ranks: list[int]
    final_ranks: list[int]
    params_before: int
    params_after: int  # elements saved: cores, bias and kept buffers (an embedding's padding row)
    kept_dense: bool = False  # the learned factorization was not smaller than the dense layer
    paired: bool = False  # an mpo layout: core k carries input mode k and output mode k


@dataclass(kw_only=True)
class Report:
    """What happened to the model (built by keyword: two dozen fields are too many to place).

    ``ratio`` = tensor elements of the dense model's state / those of the slim checkpoint
    (every tensor, buffers included, a shared tensor once): what ``target`` is met on, unless the
    weights are quantized (then ``bytes_ratio`` is).
    ``param_ratio`` counts parameters only, for comparison with papers.
    """

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
    param_ratio: float | None = None
    resumed_from: int | None = None  # the step a resumed run continued from
    # How the gated layers started: "faithful" (from the weights, within "error") or "ladder",
    # the start ratio, and the layers that could not start faithfully within their dense size.
    start: dict[str, Any] | None = None
    # Training examples each process saw (one entry per rank; several under torchrun).
    samples_per_rank: list[int] = field(default_factory=list)
    # Real (non-padding) tokens the loss saw, per process (zeros when the batches are not tokens).
    tokens_per_rank: list[int] = field(default_factory=list)
    # The options the run left to the tool, as the tool set them (init, refit, lr, gate_lr).
    chosen: dict[str, Any] = field(default_factory=dict)
    # The steps the schedule planned, and why the run stopped: "budget" (the default budget was
    # spent), "epochs" or "max_steps" (as asked), "early_stop" or "time_budget".
    planned_steps: int = 0
    stopped: str = ""
    # Steps a rank search (pstrn) trained its candidates before the fine-tune: with ``steps``,
    # the run's whole budget (0: the selector does not search).
    search_steps: int = 0
    # Per phase, "gates" (gates and weights learn until the freeze, pruning and refit included) and
    # "weights" (the pruned model's fine-tune): steps, samples, tokens and seconds. The phases'
    # steps add up to ``steps``; their seconds are the fine-tune's (``seconds`` adds the set-up).
    phases: dict[str, dict[str, float]] = field(default_factory=dict)
    # The default budget (None: the user gave epochs): unit (samples or tokens), per_batch,
    # examples asked for, epochs, steps, and the part of the rule that set it (bound).
    budget: dict[str, Any] | None = None
    # Early stop's checks ([step, held-out loss]), best loss and stopping step (None: off).
    early_stop: dict[str, Any] | None = None
    time_budget: float | None = None  # the seconds the run was given (None: no limit)
    # Bytes of the slim checkpoint's tensors (headers aside) and of the dense model's state in
    # float32, and their ratio: what ``target`` is met on with ``quantize`` "int8" (its weights and
    # cores int8 with their scales, made by ``quantizer``), where the run aimed at the element ratio
    # ``aimed_ratio`` (None without quantization: the target counts elements).
    bytes: int = 0
    dense_bytes: int = 0
    bytes_ratio: float | None = None
    quantize: str = "none"
    quantizer: str | None = None
    aimed_ratio: float | None = None
    # The forms the slim model would be served in (``compress run --form``; the file keeps the
    # cores): ``serving.FormChoice.to_dict()``, per layer the form, sizes and measured speed-ups.
    forms: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def history_fields(history: TrainHistory) -> dict[str, Any]:
    """The report's fields that the fine-tune's history gives, by name."""
    return {"steps": history.steps, "forced": history.forced, "ratio_before_force": history.ratio_before_force,
            "epochs": history.epochs, "resumed_from": history.resumed_from,
            "samples_per_rank": history.samples_per_rank, "tokens_per_rank": history.tokens_per_rank,
            "planned_steps": history.planned_steps, "stopped": history.stopped,
            "phases": {name: dict(counts) for name, counts in history.phases.items()},
            "early_stop": history.early_stop, "time_budget": history.time_budget, "budget": history.budget}


def start_summary(start: Any, accuracy: float | None) -> dict[str, Any] | None:
    """How the factorized model started (see ``selectors.faithful_start``), for the report:
    its accuracy at step 0 (before any training) says how faithful the start was."""
    if start is None:
        return {"accuracy": accuracy} if accuracy is not None else None
    return {"chosen": start.chosen, "ratio": start.ratio, "error": start.used_eps, "gates_idle": start.gates_idle,
            "accuracy": accuracy, "whitened": sum(s.whitened for s in start.layers),
            "head_weighted": sum(s.head_weighted for s in start.layers),
            "unfaithful": [{"name": s.name, "error": s.error, "params": s.params, "dense": s.dense}
                           for s in start.unfaithful]}
