"""One validated configuration object for a compression run.

Everything a run needs is checked here, before any model is touched, so a bad option
fails in milliseconds with a one-line message instead of after minutes of fine-tuning.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .errors import ConfigError, TargetError
from .gates import DEEP_MARGIN, DEEP_STACK, deep_stack
from .planner import PlanOptions
from .quantize import SCHEMES
from .selectors import DEFAULT_SELECTOR, START_ERROR, RankSelector, SelectorOptions
from .tensornet import DECOMPS

PENALTIES = ("params", "count")
DISTILL_LOSSES = ("auto", "kl", "mse")
STARTS = ("auto", "faithful", "ladder")
INITS = ("auto", "weights", "activations")
#: Default Adam learning rate of the weights (cores, biases, untouched layers) of a small network.
DEFAULT_LR = 1e-3
#: ... and of a deep stack: a pretrained transformer's fine-tuning rate. At 1e-3 SmolLM2-135M
#: at 1.25x ended at held-out perplexity 259.5 instead of 232.9 (the same run at 5e-5).
DEEP_STACK_LR = 5e-5


def parse_target(target: Any) -> float:
    """Accept ``"5x"``, ``"5X"``, ``"5"``, ``5`` or ``5.0``: dense params / compressed params."""
    raw = target
    if isinstance(target, str):
        text = target.strip().lower()
        if text.endswith("x") or text.endswith("×"):
            text = text[:-1].strip()
        try:
            target = float(text)
        except ValueError:
            raise TargetError(f"target {raw!r} is not a number; write it like '5x' or 5.0") from None
    if isinstance(target, bool) or not isinstance(target, (int, float)):
        raise TargetError(f"target {raw!r} is not a number; write it like '5x' or 5.0")
    target = float(target)
    if not math.isfinite(target):
        raise TargetError(f"target {raw!r} must be a finite number")
    if target <= 1.0:
        raise TargetError(f"target {raw!r} must be greater than 1 (it is dense size / compressed size)")
    return target


def parse_duration(value: Any) -> float:
    """Seconds of ``"10m"``, ``"90s"``, ``"1.5h"``, ``"1h30m"``, ``"600"`` or ``600``.

    Anything else raises ``ConfigError``."""
    if isinstance(value, bool):
        raise ConfigError(f"time budget {value!r} is not a duration")
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip().lower().replace(" ", "")
    units = {"": 1, "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1, "m": 60, "min": 60, "mins": 60,
             "minute": 60, "minutes": 60, "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600}
    parts = list(_DURATION.finditer(text))
    if not text or "".join(p.group(0) for p in parts) != text or any(p.group(2) not in units for p in parts):
        raise ConfigError(f"time budget {value!r} is not a duration; write it like 10m, 90s, 1.5h or a number "
                          "of seconds")
    if len(parts) > 1 and any(p.group(2) == "" for p in parts):
        raise ConfigError(f"time budget {value!r} is not a duration; give every part a unit, like 1h30m")
    return sum(float(p.group(1)) * units[p.group(2)] for p in parts)


#: A number and its unit, one part of a duration ("1h30m" has two).
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([a-z]*)")


FilterFn = Callable[[nn.Module, str], bool]


# Checks named in a field's metadata: ``check(label, value)`` raises ConfigError, where
# ``label`` is how the message names the option (the field name unless metadata says otherwise).
def _number(value: Any) -> bool:
    """A real number (not a bool, not a string); NaN and infinities included, judged by the caller."""
    return not isinstance(value, bool) and isinstance(value, (int, float))


def positive(label: str, value: Any) -> None:
    if not _number(value) or not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{label} must be a number > 0, got {value!r}")


def positive_int(label: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{label} must be a positive integer, got {value!r}")


def non_negative_int(label: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{label} must be a non-negative integer, got {value!r}")


def non_negative(label: str, value: Any) -> None:
    if not _number(value) or not value >= 0:
        raise ConfigError(f"{label} must be >= 0, got {value!r}")


def finite_non_negative(label: str, value: Any) -> None:
    if not _number(value) or not (value >= 0 and math.isfinite(value)):
        raise ConfigError(f"{label} must be >= 0 and finite, got {value!r}")


#: The largest gate noise std accepted: at σ = 10 a gate near 1 is already a coin flip every
#: step (Φ(1/10) ≈ 0.54), so a larger σ only overflows (σ = 1e300 ends in a float overflow).
MAX_SIGMA = 10.0


def gate_noise(label: str, value: Any) -> None:
    positive(label, value)
    if value > MAX_SIGMA:
        raise ConfigError(f"{label} must be at most {MAX_SIGMA:g} (the gates' noise std; 0.5 in the paper), "
                          f"got {value!r}")


#: Seeds run from 0 to the largest int64: every generator a run seeds (torch's, a loader's
#: ``torch.Generator``, NumPy's) takes them all.
MAX_SEED = 2 ** 63 - 1


def seed_value(label: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{label} must be an integer from 0 to 2**63 - 1, got {value!r}")


#: Device types that hold no data (``meta``) or none a model can run on.
NO_RUN_DEVICES = ("meta",)


def unit_fraction(label: str, value: Any) -> None:
    if not _number(value) or not 0.0 < value <= 1.0:
        raise ConfigError(f"{label} must be in (0, 1], got {value}")


def unit_interval(label: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{label} must be in [0, 1), got {value!r}")


def skip_patterns(label: str, value: Any) -> None:
    if not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{label} takes a list of layer kinds or module-path globs, got {value!r}")


def layer_filter(label: str, value: Any) -> None:
    if not callable(value):
        raise ConfigError(f"{label} must be callable as {label}(module, fqn) -> bool")


def forward_function(label: str, value: Any) -> None:
    if not callable(value):
        raise ConfigError(f"{label} must be callable as {label}(model, batch) -> (output, labels)")


def device_name(label: str, value: Any) -> None:
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{label} {value!r} is not a device; write it like cpu, cuda or cuda:1") from None
    if device.type in NO_RUN_DEVICES:
        raise ConfigError(f"{label} {value!r} holds no data and cannot run a model; write it like cpu, cuda "
                          "or cuda:1")


#: The layouts ``tensorization`` names for every layer: the input modes' cores then the output
#: modes' (``balanced``, the default), or core k carrying input mode k and output mode k (``mpo``).
TENSORIZATIONS = ("balanced", "mpo")


def tensorization_value(value: Any) -> Any:
    """``None`` and ``"balanced"`` as the default (no per-layer override); anything else as given."""
    return {} if value is None or value == "balanced" else value


def tensorization_option(label: str, value: Any) -> None:
    """``"mpo"`` or a per-layer dict ``{fqn: (in_modes, out_modes)}`` (the planner checks the modes)."""
    if isinstance(value, dict) or value == "mpo":
        return
    raise ConfigError(f"unknown {label} {str(value)[:60]!r}; choose {' or '.join(TENSORIZATIONS)}, or give a per-layer "
                      "dict {fqn: (in_modes, out_modes)}")


def rank_map(label: str, value: Any) -> None:
    for name, rank in value.items():
        ranks = [rank] if isinstance(rank, int) else list(rank)
        if not ranks or any(not isinstance(r, int) or r <= 0 for r in ranks):
            raise ConfigError(f"{label}[{name!r}] must be positive integers, got {rank!r}")


@dataclass
class CompressConfig:
    """Options of :func:`compressor.compress`; ``None`` means "the tool chooses".

    Each field documents and validates itself through its metadata (peft-style):
    ``help`` (also the CLI help), ``choices`` (the allowed names), ``check`` (a function
    above), ``convert`` (normalises the value first) and ``label`` (the name used in
    messages). Everything is checked here, before any model is touched.
    """

    target: Any = field(default=5.0, metadata={
        "help": "compression ratio of the whole model as saved, e.g. 5x: tensor elements of the dense "
                "model's state / those of the slim checkpoint (buffers, biases and untouched layers "
                "included, a tied tensor once); with --quantize int8, the bytes of the dense float32 file / "
                "those of the slim file (its tensors: int8 weights and their scales, float32 biases and norms)",
        "convert": parse_target})
    quantize: str = field(default="none", metadata={
        "help": "after pruning, store the factorized layers' cores and the weights of layers left dense as int8 "
                "(symmetric, one float32 scale per output channel, or per slice of a core along whichever side "
                "quantizes it best; biases, norms and buffers stay float32): the file shrinks about 4x more, and "
                "loading gives back exactly the weights the run measured (they compute in float32)",
        "choices": SCHEMES, "label": "quantization"})
    decomp: str = field(default="tr", metadata={
        "help": "tr (tensor ring) or tt (tensor train)", "choices": DECOMPS, "label": "decomposition"})
    rank: int | None = field(default=None, metadata={
        "help": "initial rank of every bond; the gates learn how much of it to keep (default: chosen from "
                "the weights, see --start)",
        "check": positive_int})
    start: str = field(default="auto", metadata={
        "help": "how gated selectors start: faithful (each layer's layout and ranks chosen from its weights "
                "to reproduce them within --start-error, no layer larger than dense), ladder (one generous "
                "rank of 16..64), or auto (faithful when every layer can start faithfully or the start is fitted to "
                "activations, else ladder)",
        "choices": STARTS})
    start_error: float = field(default=START_ERROR, metadata={
        "help": "relative error (Frobenius) each layer's starting factorization may have (of its outputs on "
                "calibration inputs with --init activations)", "check": unit_fraction,
        "label": "start error"})
    init: str = field(default="auto", metadata={
        "help": "what a gated start is fitted to: weights (TT-SVD of each pretrained weight), activations "
                "(each Linear's output on --calibration-batches training batches: the weight whitened by its "
                "inputs, as SVD-LLM does; far more faithful on trained transformers), or auto (activations "
                f"for a deep stack of more than {DEEP_STACK} factorized layers such as a transformer, weights "
                "for a small network or with --rank or --start ladder)",
        "choices": INITS})
    calibration_batches: int = field(default=8, metadata={
        "help": "training batches whose layer inputs fit an activations start (an embedding's token counts "
                "cover up to 128, which cost little more than loading them)", "check": positive_int})
    sigma: float = field(default=0.5, metadata={
        "help": f"gate noise std, at most {MAX_SIGMA:g} (0.5 works best in the IJCAI 2024 paper)",
        "check": gate_noise})
    gate_margin: float | None = field(default=None, metadata={
        "help": "gate means start this many sigmas above 1, so training noise spares the start (default: 0 "
                "for up to 16 factorized layers, 2 for deeper stacks, whose layers multiply each other's noise)",
        "check": finite_non_negative, "label": "gate margin"})
    lam: float | None = field(default=None, metadata={
        "help": "initial l0 penalty weight; the target controller adapts it (default: calibrated)",
        "check": finite_non_negative, "label": "lambda"})
    penalty: str | None = field(default=None, metadata={
        "help": "params weighs each gate by the parameters it costs (aims straight at a size target); count is the "
                "paper's plain sum of Phi(mu/sigma) (default: params, or the selector's own: count for mars)",
        "choices": PENALTIES})
    rank_select: str = field(default=DEFAULT_SELECTOR, metadata={
        "help": "how ranks are chosen: " + "; ".join(f"{name}: {s.help}" for name, s in RankSelector.registry.items()),
        "choices": RankSelector.registry.keys(), "label": "rank selector"})
    reinforce_samples: int = field(default=5, metadata={
        "help": "samples per step of the reinforce baseline", "check": positive_int})
    epochs: int | None = field(default=None, metadata={
        "help": "fine-tuning epochs, gate phase + weight-only phase (default: a budget of 384,000 samples, or "
                "tokens for token batches, fewer for a large model: 3e12 / its parameters; at least 100 steps, "
                "whole epochs, at most 100; giving epochs turns early stop off)",
        "check": non_negative_int})
    max_steps: int | None = field(default=None, metadata={
        "help": "stop after this many optimizer steps, whatever the epochs (default: no limit; giving it turns "
                "early stop off)",
        "check": positive_int})
    time_budget: float | None = field(default=None, metadata={
        "help": "wall-clock limit of the whole run, e.g. 10m, 90s, 1.5h, or seconds as a number: the run times "
                "its first steps and plans the gate and weight phases to end within it (default: no limit)",
        "convert": parse_duration, "check": positive, "label": "time budget"})
    early_stop: bool | None = field(default=None, metadata={
        "help": "end the weight phase when the held-out loss stops improving: checked 10 times over the weight "
                "phase on 4 batches of the evaluation data, or of the training data drawn at the start when "
                "there is none (default: on, off when epochs or max_steps is given)"})
    early_stop_patience: int = field(default=3, metadata={
        "help": "early stop: checks in a row without improvement that end the weight phase",
        "check": positive_int, "label": "early-stop patience"})
    early_stop_min_delta: float = field(default=0.002, metadata={
        "help": "early stop: the relative fall of the held-out loss below its best that counts as an "
                "improvement (0.002: 0.2 %)",
        "check": unit_interval, "label": "early-stop min delta"})
    gate_fraction: float = field(default=0.5, metadata={
        "help": "share of the budget in which the gates may move; the target is met by its end at the latest",
        "check": unit_fraction})
    refit: bool | None = field(default=None, metadata={
        "help": "when the gates freeze, keep the ranks they learned but fit the cores again to the pretrained "
                "weights (to the layers' outputs with --init activations), then fine-tune: the weight phase "
                "starts from a clean truncation instead of the noisy gate phase's weights (gated selectors; "
                f"default: on for a deep stack of more than {DEEP_STACK} factorized layers; a small network "
                "measures both starts on 4 training batches at the freeze and keeps the one with the lower loss)"})
    lr: float | None = field(default=None, metadata={
        "help": f"Adam learning rate of the cores and other weights (default {DEFAULT_LR:g}, or {DEEP_STACK_LR:g} "
                f"for a deep stack of more than {DEEP_STACK} factorized layers, a pretrained transformer's rate)",
        "check": positive})
    gate_lr: float | None = field(default=None, metadata={
        "help": "Adam learning rate of the gate means (default 0.05, raised on a short budget so that a gate "
                "can close within a quarter of the gate phase)", "check": positive})
    weight_decay: float = field(default=0.0, metadata={
        "help": "weight decay of the cores and other weights", "check": finite_non_negative})
    distill: float = field(default=0.0, metadata={
        "help": "weight of distillation from the original model when labels exist (0 = off); "
                "without labels the run always distils",
        "check": finite_non_negative, "label": "distill weight"})
    distill_hidden: float = field(default=0.0, metadata={
        "help": "weight of matching every block's hidden states to the original model's (CoFi-style, per "
                "channel, padding excluded), with or without labels; for models built of repeated blocks "
                "such as transformers (0 = off)",
        "check": finite_non_negative, "label": "distill-hidden weight"})
    distill_loss: str = field(default="auto", metadata={
        "help": "kl on logits, mse on outputs, or auto (KL for logits, also per token; MSE for hidden states)",
        "choices": DISTILL_LOSSES, "label": "distillation loss"})
    temperature: float = field(default=1.0, metadata={
        "help": "softmax temperature of the KL distillation loss", "check": positive})
    min_params: int = field(default=1000, metadata={
        "help": "layers whose weight has fewer entries stay dense", "check": non_negative})
    skip: tuple[str, ...] = field(default=(), metadata={
        "help": "leave layers dense: a layer kind (embedding, linear, conv2d, conv1d) or a glob on the module "
                "path (model.layers.*.mlp.down_proj); repeatable. A tied embedding stays dense with its head",
        "convert": lambda v: (v,) if isinstance(v, str) else tuple(v), "check": skip_patterns})
    filter_fn: FilterFn | None = field(default=None, metadata={
        "help": "filter_fn(module, fqn) -> bool narrows which layers are compressed", "check": layer_filter})
    forward_fn: Callable[[nn.Module, Any], Any] | None = field(default=None, metadata={
        "help": "forward_fn(model, batch) -> (output, labels): how to run the model on a batch the built-in "
                "conventions do not cover (x, (x, y), a dict of keyword inputs with optional 'labels')",
        "check": forward_function})
    tensorization: dict[str, tuple[Sequence[int], Sequence[int]]] | str = field(default_factory=dict, metadata={
        "help": "how every factorized layer's weight is split into cores: balanced (the input modes' cores, "
                "then the output modes') or mpo (a matrix product operator: input and output split into as many "
                "balanced modes, core k carrying input mode k and output mode k; a conv's kernel window is a core "
                "of its own; the faithful start keeps that layout). In the API also a per-layer override "
                "{fqn: (in_modes, out_modes)}",
        "convert": tensorization_value, "check": tensorization_option})
    layer_ranks: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "per-layer initial rank override, {fqn: int or [bond sizes]}", "check": rank_map})
    device: str | None = field(default=None, metadata={
        "help": "where the run computes, e.g. cpu, cuda, cuda:1 (default: where the model is)",
        "check": device_name})
    bf16: bool = field(default=False, metadata={
        "help": "fine-tune under bfloat16 autocast (weights stay in their dtype)"})
    seed: int = field(default=0, metadata={
        "help": "random seed of the run, 0 to 2**63 - 1 (the CLI also shuffles the training data with it)",
        "check": seed_value})
    log_every: int = field(default=20, metadata={
        "help": "steps between progress events", "check": positive_int})
    checkpoint_every: int | None = field(default=None, metadata={
        "help": "save the run's resumable state every N optimizer steps (it is always saved on Ctrl-C); "
                "resume with --resume", "check": positive_int})

    def __post_init__(self):
        """Validate every field from its own metadata, so a rule is written once, next to its help."""
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue  # "the tool chooses"
            meta, label = f.metadata, f.metadata.get("label", f.name)
            if "convert" in meta:
                value = meta["convert"](value)
                setattr(self, f.name, value)
            choices = meta.get("choices")
            if choices is not None and value not in choices:
                raise ConfigError(f"unknown {label} {value!r}; choose one of {', '.join(choices)}")
            if "check" in meta:
                meta["check"](label, value)
        prescribed = RankSelector.registry[self.rank_select].penalty
        if prescribed is not None and self.penalty not in (None, prescribed):
            raise ConfigError(f"rank selector {self.rank_select!r} penalises its gates by its own prior "
                              f"(penalty {prescribed!r}); penalty {self.penalty!r} does not apply to it")
        if self.init == "activations" and not RankSelector.registry[self.rank_select].gated:
            raise ConfigError(f"init 'activations' shapes a gated start; rank selector {self.rank_select!r} "
                              "chooses its ranks itself (whitened-svd and svd-llm are the ones fitted to activations)")
        if self.refit and not RankSelector.registry[self.rank_select].gated:
            raise ConfigError(f"refit keeps the ranks gates learned; rank selector {self.rank_select!r} has no gates")
        if self.rank is not None and RankSelector.registry[self.rank_select].searches:
            raise ConfigError(f"rank sets every bond; rank selector {self.rank_select!r} searches the ranks itself")
        if self.init == "activations" and (self.rank is not None or self.start == "ladder"):
            raise ConfigError("init 'activations' fits each layer's start to its inputs; it cannot be combined "
                              "with a fixed rank or start 'ladder'")
        self._check_paired()

    @property
    def paired(self) -> bool:
        """Whether every factorized layer is laid out as a matrix product operator (``tensorization="mpo"``)."""
        return self.tensorization == "mpo"

    def _check_paired(self) -> None:
        """What an mpo layout cannot be combined with: a start fitted to activations folds the
        input's whitening into the one core holding the whole input, and the two-factor selectors
        lay every weight out as a plain matrix (one core each side), which no pairing has."""
        if not self.paired:
            return
        if self.init == "activations":
            raise ConfigError("init 'activations' needs the whole input in one core; tensorization 'mpo' spreads "
                              "it over every core (use init 'weights')")
        if RankSelector.registry[self.rank_select].two_factors:
            raise ConfigError(f"rank selector {self.rank_select!r} lays every weight out as a two-factor matrix; "
                              "it cannot use tensorization 'mpo'")

    def plan_options(self) -> PlanOptions:
        """What the planner reads: which layers to factorize, and their per-layer overrides."""
        overrides = {} if self.paired else self.tensorization
        return PlanOptions(self.min_params, self.skip, self.filter_fn, overrides, self.layer_ranks, self.rank,
                           self.paired)

    def selector_options(self) -> SelectorOptions:
        """What a rank selector reads: the target, the decomposition, the gates and the start."""
        return SelectorOptions(self.target, self.decomp, self.sigma, self.gate_margin, self.rank, self.start,
                               self.start_error, self.init, () if self.paired else tuple(self.tensorization))

    def settled(self, layers: int, observable: bool = True) -> "Settled":
        """This config with the choices left to the tool that depend on the model's depth made,
        for a plan of ``layers`` factorized layers (``observable``: some of whose inputs a
        calibration pass can watch; convolutions start from their weights either way), and
        the record of what was left and why (:class:`Settled`).

        A deep stack (a transformer) starts from its activations and refits when the gates
        freeze: trained transformer weights are near full rank while what their layers do on
        real inputs is not, and a deep stack's gate phase leaves noisy weights to heal. On
        SmolLM2-135M at 1.5x the weights start without refit ends at held-out perplexity 1168,
        activations with refit at 251 (that run kept the embedding dense). On LeNet-5 (4
        layers) the activations start loses from 20x on, so a small network starts from its
        weights; refit is worth 0.4 points at 5x but costs 4.6 at 100x, so a small network leaves
        refit None: the run measures both starts when the gates freeze and keeps the better
        (``GatePhase.refit_or_keep``). The weights' learning rate depends on depth whatever the
        selector (:data:`DEEP_STACK_LR`), and so do the gates' starting means
        (:func:`~compressor.gates.start_margin`: :data:`~compressor.gates.DEEP_MARGIN` sigmas up).
        """
        selector = RankSelector.registry[self.rank_select]
        gated, penalty = selector.gated, self.penalty or selector.penalty or "params"
        deep = deep_stack(layers)  # the one place a run asks
        init = self.init
        if init == "auto":
            fits = gated and deep and observable and self.rank is None and self.start != "ladder" and not self.paired
            init = "activations" if fits else "weights"
        refit = (True if gated and deep else None if gated else False) if self.refit is None else self.refit
        lr = self.lr if self.lr is not None else DEEP_STACK_LR if deep else DEFAULT_LR
        margin = self.gate_margin if self.gate_margin is not None else DEEP_MARGIN if deep else 0.0
        early_stop = self.early_stop if self.early_stop is not None else self.epochs is None and self.max_steps is None
        left = tuple(name for name in TOOL_CHOICES if getattr(self, name) in (None, "auto"))
        return Settled(replace(self, init=init, refit=refit, lr=lr, gate_margin=margin, early_stop=early_stop,
                               penalty=penalty), layers, deep, left)


#: The options a run may leave to the tool and reports the values of, in the report's order.
TOOL_CHOICES = ("init", "refit", "lr", "gate_lr")


@dataclass(frozen=True)
class Settled:
    """A run's options with the depth-dependent defaults made, and what the tool chose and why.

    Made once per run (:meth:`CompressConfig.settled`), right after planning: the set-up line
    (:meth:`stage_line`), the report's ``chosen`` (:meth:`chosen`) and the resume fingerprint
    (of ``config``) all read it here instead of working the choices out again.
    """

    config: CompressConfig  # every option, those left to the tool made
    layers: int  # factorized layers in the plan: what the choices depend on
    deep: bool  # more than DEEP_STACK of them (``gates.deep_stack``)
    left: tuple[str, ...]  # the options of TOOL_CHOICES the user left to the tool

    def stage_line(self) -> str | None:
        """What a deep stack does by default that a small network does not, as the flags a user
        would write, e.g. ``a deep stack of 18 factorized layers: --init activations, --refit,
        --lr 5e-05 by default`` (None when nothing was chosen for depth)."""
        said = []
        if "init" in self.left and self.config.init == "activations":
            said.append("--init activations")
        if "refit" in self.left and self.config.refit:
            said.append("--refit")
        if "lr" in self.left and self.deep:
            said.append(f"--lr {self.config.lr:g}")
        return f"a deep stack of {self.layers} factorized layers: {', '.join(said)} by default" if said else None

    def chosen(self, refitted: bool | None = None, gate_lr: float | None = None) -> dict[str, Any]:
        """The options left to the tool with the values the run used: ``refitted`` is what a
        small network's run decided at the freeze (None: no such decision), ``gate_lr`` the
        rate the gate phase's means moved at (None: no gates)."""
        chosen = {name: getattr(self.config, name) for name in ("init", "refit", "lr") if name in self.left}
        if "refit" in chosen and refitted is not None:
            chosen["refit"] = refitted
        if "gate_lr" in self.left and gate_lr is not None:
            chosen["gate_lr"] = gate_lr
        return chosen
