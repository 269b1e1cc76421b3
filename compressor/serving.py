"""Which form each factorized layer is served in (``form="auto"``): measured where the model runs,
at the shapes it serves, chosen within the size target.

Why measure: which form is fastest depends on the machine, the batch and the ranks together
(cores win at batch 1 for deep trains, factors at mid ranks, dense at large batches with high
ranks), and no FLOP count predicts a BLAS library's efficiency on thin matrices. So the model
is run once at each served input shape (:class:`Serving`) to see the input every factorized
layer gets, and each layer is then timed alone in each of its forms on random inputs of those
shapes: interleaved repeats (one warm-up call each), medians, a few ms per layer; identical
modules at identical shapes (the dense form of every layer of one shape in an LLM) are timed once.

How the forms are chosen (:func:`select`): every layer starts in its cores (the checkpoint's own
form, which meets the target). A layer's *cost* in a form is its time summed over the served
shapes, each shape's time divided by the whole factorized part's time in cores at that shape, so
decode and prefill weigh alike whatever their absolute times. Moving a layer to a faster form
gains cost and may spend parameters; the model's state in the chosen forms must stay within
``dense size / target``. This is a multiple-choice knapsack, and the greedy rule used for it
takes, again and again, the move with the most gain per extra parameter that still fits (a move
that spends none, or frees some, first). A move must be faster in sum by more than
:data:`NOISE`: forms of equal arithmetic (a two-core train is its own factors) differ only by
noise, and a few hundred coin flips of a few ms each made ``auto`` slower than plain cores. A
move may be slower at one served shape if it gains more at the others (LeNet-5's conv2 as three
convs: ~1.1x its cores' time at batch 1, ~0.5x at batch 256); the whole-model check bounds what
such trades cost. Each move makes its layer strictly faster, so it ends;
it ends only when no faster form of any layer fits, so a form slower than dense is never kept
when the dense layer fits the budget, a layer whose every form is slower than dense but whose
dense does not fit keeps its fastest that fits, and with no room at all everything stays cores.

Then the whole model is checked (:func:`in_model`): run at each served input with the picked
layers swapped in and out, interleaved, medians. A layer timed alone keeps its weights in the
CPU's caches, which a model streaming hundreds of MB per token does not, so alone a larger form
looks faster than it is; if the picked forms are slower than all cores in sum over the served
shapes, or slower by more than :data:`NOISE` at any one, every layer keeps its cores. So ``auto``
is, as measured in the model, faster than the cores or the cores themselves.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .batches import call_model
from .errors import ConfigError
from .forms import FORMS, Group, check_form, convert, groups
from .layers import TiedTNLinear, TNEmbedding, TNLayer
from .plan import count_state
from .surgery import evaluation_mode

#: Served shapes of a model taking token ids: a decode step (1 token) and an 8 x 128 prefill.
TOKEN_SHAPES = ((1, 1), (8, 128))
#: Served batch sizes of any other model (its example's shape gives the rest).
BATCHES = (1, 256)
#: About how long one layer's forms are timed at one shape (plus one warm-up call each).
SECONDS_PER_SHAPE = 0.012
MIN_REPEATS, MAX_REPEATS = 3, 25
#: About how long the whole model is timed at one served shape in each state (3 to 9 rounds).
MODEL_SECONDS_PER_SHAPE = 1.0
MODEL_ROUNDS = (3, 9)

#: ``timer(module, x)``: seconds one call of ``module`` on ``x`` takes (tests inject a fake one).
Timer = Callable[[nn.Module, torch.Tensor], float]


def parse_shape(text: str) -> tuple[int, ...]:
    """``"8x128"`` -> ``(8, 128)``: positive integers joined by ``x``; one :class:`ConfigError` line otherwise."""
    try:
        shape = tuple(int(part) for part in str(text).lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise ConfigError(f"a serve shape is positive integers joined by x (1x1, 8x128, 256x1x28x28), not {text!r}")
    return shape


@dataclass(frozen=True)
class Serving:
    """The inputs a model serves: their full shapes (token ids ``B x T``, or e.g. ``B x C x H x W``),
    whether they are token ids (drawn below ``vocab``), and the floating dtype otherwise."""

    shapes: tuple[tuple[int, ...], ...]
    tokens: bool = False
    vocab: int = 0
    dtype: torch.dtype = torch.float32

    def inputs(self) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        if self.tokens:
            return [torch.randint(0, self.vocab, s, generator=g) for s in self.shapes]
        return [torch.randn(s, generator=g, dtype=self.dtype) for s in self.shapes]

    def labels(self) -> list[str]:
        return ["x".join(map(str, s)) for s in self.shapes]


def _input_embedding(model: nn.Module) -> nn.Module | None:
    """The model's first lookup table (where token ids go), if it has one."""
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            return get()
        except (NotImplementedError, AttributeError):
            pass
    return next((m for m in model.modules() if isinstance(m, (nn.Embedding, TNEmbedding))), None)


def serving(model: nn.Module, shapes: Sequence[Sequence[int]] | None = None, example: Any = None) -> Serving:
    """What ``model`` serves: ``shapes`` (a shorter shape is completed from ``example``'s: ``(256,)``
    with an example of ``(8, 1, 28, 28)`` is ``(256, 1, 28, 28)``), by default a decode step and an
    8 x 128 prefill for a model taking token ids (an integer ``example``, or none and an embedding
    first), batch 1 and 256 of ``example`` otherwise."""
    table = _input_embedding(model)
    tokens = (example.dtype in (torch.int32, torch.int64)) if torch.is_tensor(example) else table is not None
    if example is not None and not torch.is_tensor(example):
        raise ConfigError(f"an example input must be a tensor, not {type(example).__name__}")
    if torch.is_tensor(example):
        rest = tuple(example.shape[1:])
    elif tokens or shapes:
        rest = (1,) if tokens else ()
    else:
        raise ConfigError("form='auto' needs the shapes the model serves: give the full input shapes "
                          "(e.g. 1x1x28x28 and 256x1x28x28) or an example input")
    if shapes:
        full = tuple(tuple(int(d) for d in s) + rest[len(s) - 1:] if len(s) <= len(rest) else tuple(s)
                     for s in shapes)
    else:
        full = tuple(TOKEN_SHAPES) if tokens else tuple((b,) + rest for b in BATCHES)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if tokens and isinstance(limit, int):
        full = tuple((s[0], min(s[1], limit)) + s[2:] if len(s) > 1 else s for s in full)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    vocab = getattr(table, "num_embeddings", None) or (int(example.max()) + 1 if torch.is_tensor(example) else 1)
    return Serving(full, tokens, int(vocab), dtype)


# ------------------------------------------------------------------ measuring
def wall_clock(module: nn.Module, x: torch.Tensor) -> float:
    """Seconds one call of ``module`` on ``x`` takes (a GPU synchronised around it)."""
    cuda = x.is_cuda
    with torch.no_grad():
        if cuda:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        module(x)
        if cuda:
            torch.cuda.synchronize(x.device)
        return time.perf_counter() - start


def whole_model_clock(model: nn.Module, x: torch.Tensor) -> float:
    """Seconds one call of the whole ``model`` on ``x`` takes (:func:`wall_clock`, inputs as a batch)."""
    start = time.perf_counter()
    with torch.no_grad():
        call_model(model, x)
    return time.perf_counter() - start


def _key(module: nn.Module, x: torch.Tensor) -> tuple:
    """Modules with equal keys take equal time on equal inputs: their type, structure and tensor shapes."""
    parts: list[Any] = [type(module).__name__, repr(module), tuple(x.shape), x.dtype, str(x.device)]
    for m in module.modules():
        if isinstance(m, TNLayer):
            parts.append(str(m.spec()))
        if isinstance(m, TiedTNLinear):
            parts.append(str(m.source.spec()))
    parts.append(tuple(tuple(t.shape) for t in module.state_dict().values()))
    return tuple(parts)


def _interleaved(modules: Mapping[str, nn.Module], x: torch.Tensor, timer: Timer, cache: dict) -> dict[str, float]:
    """Median seconds of each module on ``x``: one warm-up call each, then rounds in which every
    module runs once (so a slow spell of the machine hits all of them), as many as fit in
    :data:`SECONDS_PER_SHAPE` (3 to 15). A module timed before at this shape is not timed again."""
    keys = {form: _key(m, x) for form, m in modules.items()}
    todo = {form: m for form, m in modules.items() if keys[form] not in cache}
    if todo:
        warm = sum(timer(m, x) for m in todo.values())  # first calls plan einsums and allocate: not timed
        repeats = min(MAX_REPEATS, max(MIN_REPEATS, int(SECONDS_PER_SHAPE / max(warm, 1e-9))))
        samples: dict[str, list[float]] = {form: [] for form in todo}
        for _ in range(repeats):
            for form, m in todo.items():
                samples[form].append(timer(m, x))
        for form, times in samples.items():
            cache[keys[form]] = statistics.median(times)
    return {form: cache[keys[form]] for form in modules}


def _probe(model: nn.Module, found: Sequence[Group], serve: Serving) -> list[dict[int, list[tuple]]]:
    """Per served input, ``{id(member module): [(input shape, dtype) of each call]}``: what every
    factorized layer and tied head is given when the model runs on it."""
    watched = {id(m): m for g in found for m in [g.layer] + [h for _, h in g.heads]}
    calls: dict[int, list[tuple]] = {}

    def record(module: nn.Module, args: tuple) -> None:
        if args and torch.is_tensor(args[0]):
            calls.setdefault(id(module), []).append((tuple(args[0].shape), args[0].dtype))

    hooks = [m.register_forward_pre_hook(record) for m in watched.values()]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    seen = []
    try:
        with torch.no_grad(), evaluation_mode(model):
            for x in serve.inputs():
                calls = {}
                call_model(model, x.to(device))
                seen.append(calls)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _random_input(member: nn.Module, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(member, TNEmbedding):
        return torch.randint(0, member.num_embeddings, shape, device=device)
    return torch.randn(shape, dtype=dtype if dtype.is_floating_point else torch.float32, device=device)


def measure(model: nn.Module, serve: Serving, timer: Timer | None = None,
            found: Sequence[Group] | None = None) -> dict[str, dict[str, tuple[float, ...]]]:
    """``{layer: {form: seconds at each served shape}}``: each factorized layer with its tied heads,
    timed alone in each form it has on inputs of the shapes the model gives it (module docstring)."""
    timer = timer or wall_clock
    found = groups(model) if found is None else found
    seen = _probe(model, found, serve)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    cache: dict = {}
    out = {}
    for group in found:
        made = {form: m for form in FORMS if (m := group.in_form(form)) is not None}
        seconds = {form: [0.0] * len(seen) for form in made}
        for i, calls in enumerate(seen):
            for j, member in enumerate(made["cores"]):
                for shape, dtype in calls.get(id(member), []):
                    x = _random_input(member, shape, dtype, device)
                    for form, t in _interleaved({f: m[j] for f, m in made.items()}, x, timer, cache).items():
                        seconds[form][i] += t
        out[group.name] = {form: tuple(s) for form, s in seconds.items()}
    return out


# ------------------------------------------------------------------ choosing
#: A form must be this much faster than the layer's present one, summed over the served shapes,
#: to count as faster: forms of equal arithmetic (a two-core train and its factors are the same
#: two products) differ by timing noise alone, and many such coin flips add up to a slower model.
NOISE = 0.08


@dataclass(frozen=True)
class Option:
    """A layer in one form: its state elements and its time at each served shape as a share of
    the model's (``shares``); ``cost`` is their sum."""

    params: int
    shares: tuple[float, ...]

    @property
    def cost(self) -> float:
        return sum(self.shares)


def select(options: Mapping[str, Mapping[str, Option]], room: int) -> dict[str, str]:
    """``{layer: form}`` from every layer's options (each has ``"cores"``, where all layers start),
    the model growing by at most ``room`` parameters: the greedy of the module docstring. A move
    is taken only when the new form is clearly faster in sum over the served shapes."""
    chosen = {name: "cores" for name in options}
    while True:
        best = None
        for name in sorted(options):
            present = options[name][chosen[name]]
            for form, option in options[name].items():
                gain, extra = present.cost - option.cost, option.params - present.params
                if gain <= NOISE * present.cost or extra > room:
                    continue
                score = (1, gain) if extra <= 0 else (0, gain / extra)
                if best is None or score > best[0]:
                    best = (score, name, form, extra)
        if best is None:
            return chosen
        _, name, form, extra = best
        chosen[name] = form
        room -= extra


def options(params: Mapping[str, Mapping[str, int]],
            seconds: Mapping[str, Mapping[str, Sequence[float]]]) -> dict[str, dict[str, Option]]:
    """Each layer's forms as :class:`Option`: a shape's seconds divided by all layers' seconds in
    cores at that shape, summed over shapes (decode and prefill weigh alike)."""
    shapes = len(next(iter(seconds.values()))["cores"]) if seconds else 0
    totals = [sum(s["cores"][i] for s in seconds.values()) for i in range(shapes)]
    out = {}
    for name, sizes in params.items():
        times = seconds.get(name, {})
        out[name] = {form: Option(n, tuple(t / total if total > 0 else 0.0 for t, total in zip(times[form], totals)))
                     for form, n in sizes.items() if form in times}
    return out


# ------------------------------------------------------------------ checking in the model
def _put(model: nn.Module, found: Sequence[Group], made: Mapping[str, list[nn.Module]], picked: bool) -> None:
    """The layers in ``made`` (and their tied heads) put in their picked forms, or back in cores."""
    for group in found:
        modules = made.get(group.name)
        if modules is None:
            continue
        group.place(model, modules if picked else group.in_form("cores"))


def picks_hold(checked: Sequence[float]) -> bool:
    """Whether the picked forms stay, from :func:`in_model`'s speed-ups over the cores per served
    shape: faster in sum (the shapes weigh alike, as in :func:`select`) and at no shape slower by
    more than :data:`NOISE`. Nothing moved (empty) keeps nothing to judge: True."""
    if not checked:
        return True
    return sum(1 / c for c in checked) < len(checked) and min(checked) >= 1 / (1 + NOISE)


def in_model(model: nn.Module, found: Sequence[Group], picked: Mapping[str, str], serve: Serving,
             timer: Timer | None = None) -> tuple[float, ...]:
    """Per served input, the whole model's seconds in cores over its seconds in the ``picked``
    forms (above 1: the picked forms are faster), in interleaved rounds, medians; empty when
    nothing moved. Why: a layer timed alone has its weights hot in the CPU's caches and meets
    none of its neighbours' memory traffic; in the model the forms share one memory bus, so the
    sum of the layers' gains is checked where it counts. The model is left in cores."""
    made = {g.name: g.in_form(picked[g.name]) for g in found if picked.get(g.name, "cores") != "cores"}
    if not made:
        return ()
    timer = timer or whole_model_clock
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    out = []
    try:
        with torch.no_grad(), evaluation_mode(model):
            for x in serve.inputs():
                x = x.to(device)
                warm = 0.0
                for state in (False, True):  # first calls make the weight caches: not timed
                    _put(model, found, made, state)
                    warm += timer(model, x)
                low, high = MODEL_ROUNDS
                samples: dict[bool, list[float]] = {False: [], True: []}
                for _ in range(min(high, max(low, int(2 * MODEL_SECONDS_PER_SHAPE / max(warm, 1e-9))))):
                    for state in (False, True):
                        _put(model, found, made, state)
                        samples[state].append(timer(model, x))
                out.append(statistics.median(samples[False]) / max(statistics.median(samples[True]), 1e-12))
    finally:
        _put(model, found, made, False)
    return tuple(out)


@dataclass(frozen=True)
class LayerForm:
    """One factorized layer (with its tied heads, ``members``) as served: its ``form``, the state
    elements of each form it has, and each form's seconds at every served shape (empty: not timed)."""

    name: str
    form: str
    members: tuple[str, ...]
    params: dict[str, int]
    seconds: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def speedup(self, versus: str) -> tuple[float, ...]:
        """``versus``'s time / the chosen form's, per served shape (empty when not timed)."""
        mine, theirs = self.seconds.get(self.form, ()), self.seconds.get(versus, ())
        return tuple(b / a if a > 0 else math.nan for a, b in zip(mine, theirs))


@dataclass(frozen=True)
class FormChoice:
    """The forms a slim model is served in: asked (a form or ``auto``), per layer, at which served
    shapes they were timed, the size budget (``dense / target``) and the model's size in them."""

    asked: str
    layers: tuple[LayerForm, ...]
    shapes: tuple[tuple[int, ...], ...]
    budget: int | None
    params: int
    cores_params: int
    #: ``auto``: the whole model in the picked forms against all cores, per served shape (:func:`in_model`).
    in_model: tuple[float, ...] = ()
    #: ``auto``: the picked forms were slower in the model at some shape, so every layer kept its cores.
    kept_cores: bool = False

    def forms(self) -> dict[str, str]:
        return {layer.name: layer.form for layer in self.layers}

    def counts(self) -> dict[str, int]:
        """How many layers are served in each form."""
        out = {form: 0 for form in FORMS}
        for layer in self.layers:
            out[layer.form] += 1
        return {form: n for form, n in out.items() if n}

    def to_dict(self) -> dict[str, Any]:
        return {"asked": self.asked, "shapes": [list(s) for s in self.shapes], "budget": self.budget,
                "params": self.params, "cores_params": self.cores_params, "in_model_speedup_vs_cores":
                list(self.in_model), "kept_cores": self.kept_cores,
                "layers": [{"name": l.name, "form": l.form, "members": list(l.members), "params": l.params,
                            "seconds": {f: list(s) for f, s in l.seconds.items()},
                            "speedup_vs_cores": list(l.speedup("cores")),
                            "speedup_vs_dense": list(l.speedup("dense"))} for l in self.layers]}


def size_budget(dense_params: int | None, target: float | None) -> int | None:
    """The most state elements the model may hold and still meet its target (None: unknown)."""
    if not dense_params or not target:
        return None
    return int(dense_params // target)


def choose(model: nn.Module, form: str = "auto", *, budget: int | None = None, serve: Serving | None = None,
           timer: Timer | None = None, model_timer: Timer | None = None) -> FormChoice:
    """The form of every factorized layer of ``model`` (in cores): ``form`` itself for each layer
    that has it, or for ``auto`` the fastest within ``budget`` state elements (None: the model's
    present size) at ``serve``'s shapes (:func:`select`), kept only if the whole model in those
    forms is no slower than in cores at every served shape (:func:`in_model`; else all cores).
    With ``serve``, every form is timed (the speed-ups a report shows); ``timer`` replaces the
    wall clock of a layer, ``model_timer`` that of the whole model."""
    form = check_form(form)
    if form == "auto" and serve is None:
        raise ConfigError("form='auto' needs the shapes the model serves (serving(model, shapes, example))")
    found = groups(model)
    params = {g.name: {f: n for f in FORMS if (n := g.params(f)) is not None} for g in found}
    seconds = measure(model, serve, timer, found) if serve is not None else {}
    size = count_state(model)
    checked: tuple[float, ...] = ()
    if form == "auto":
        picked = select(options(params, seconds), (budget if budget is not None else size) - size)
        checked = in_model(model, found, picked, serve, model_timer)
        if not picks_hold(checked):
            picked = {name: "cores" for name in picked}
    else:
        picked = {name: form if form in sizes else "cores" for name, sizes in params.items()}
    layers = tuple(LayerForm(g.name, picked[g.name], g.members, params[g.name], seconds.get(g.name, {}))
                   for g in found)
    chosen = size + sum(l.params[l.form] - l.params["cores"] for l in layers)
    return FormChoice(form, layers, serve.shapes if serve is not None else (), budget, chosen, size, checked,
                      not picks_hold(checked))


def serve_as(model: nn.Module, form: str, *, budget: int | None = None, shapes: Sequence[Sequence[int]] | None = None,
             example: Any = None, timer: Timer | None = None,
             model_timer: Timer | None = None) -> tuple[nn.Module, FormChoice]:
    """``model`` (in cores, converted in place) in ``form``, and the choice made: :func:`choose` at
    the shapes :func:`serving` settles (timed only for ``auto``), then :func:`~compressor.forms.convert`."""
    serve = serving(model, shapes, example) if form == "auto" else None
    choice = choose(model, form, budget=budget, serve=serve, timer=timer, model_timer=model_timer)
    return convert(model, choice.forms()), choice
