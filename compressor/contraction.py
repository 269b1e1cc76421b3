"""An einsum over a fixed network, planned once per shape class and run as plain matmuls.

A factorized layer at batch 1 is a chain of small products: its cost is the calls, not the
arithmetic. ``torch.einsum`` parses its equation and permutes its operands again on every
call (about 25 µs each on a CPU, several per layer), so a :class:`Contraction` turns the
pairwise order opt_einsum picks into a fixed list of :class:`Step`\\ s, each a reshape (a
view wherever the operand's memory allows, a transposed view rather than a copy when that
is what it is) and one ``torch.matmul``. The plan depends on the batch size only through the
order (rebuild-the-weight pays off for big batches, input-first for small ones), so plans are
cached per batch-size class (powers of two) and the batch dimension is always reshaped as
``-1``: one plan serves every batch of its class, and a ``torch.export`` trace with a
symbolic batch. Autograd and export see nothing but reshapes, permutes and matmuls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import opt_einsum
import torch


@dataclass(frozen=True)
class Side:
    """How one operand enters a matmul: a permute (after a reshape to its letters' own
    dimensions when it is still a matrix), a reshape, a transpose; each only when needed."""

    perm: tuple[int, ...] | None
    shape: tuple[int, ...] | None  # None: already this shape
    transpose: bool
    unflat: tuple[int, ...] | None = None

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            t = (t if self.unflat is None else t.reshape(self.unflat)).permute(self.perm)
        if self.shape is not None:
            t = t.reshape(self.shape)
        return t.mT if self.transpose else t


@dataclass(frozen=True)
class Step:
    """One contraction of the working list's operands at ``picked`` (removed; the result is
    appended), as the matrix ``matmul(a(first), b(second))``. A step matmul cannot
    do (a letter shared by both sides and kept, a letter summed on one side only, a lone
    operand's trace) runs as its ``einsum`` equation instead: never for a TT/TR layer's
    network, whose every bond joins two cores."""

    picked: tuple[int, ...]
    a: Side | None = None
    b: Side | None = None
    einsum: str | None = None
    unflat: tuple[tuple[int, ...] | None, ...] = ()  # an einsum's operands back to their letters' dimensions

    def __call__(self, ops: list[torch.Tensor]) -> None:
        taken = {k: ops.pop(k) for k in sorted(self.picked, reverse=True)}
        args = [taken[k] for k in self.picked]
        if self.einsum is not None:
            args = [a if u is None else a.reshape(u) for a, u in zip(args, self.unflat)]
            ops.append(torch.einsum(self.einsum, *args))
            return
        ops.append(torch.matmul(self.a(args[0]), self.b(args[1])))


@dataclass(frozen=True)
class Finish:
    """The last result brought to the output's letters: a reshape to its own letters, then a permute."""

    shape: tuple[int, ...] | None
    perm: tuple[int, ...] | None

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if self.shape is not None:
            t = t.reshape(self.shape)
        return t if self.perm is None else t.permute(self.perm)


def batch_class(n: int) -> int:
    """The batch size a plan is made for: ``n`` rounded up to a power of two."""
    return 1 << max(0, int(n) - 1).bit_length()


class Contraction:
    """An einsum over a fixed network whose pairwise order opt_einsum picks once per shape class.

    ``batch`` names the letter (in one input only) whose size varies from call to call; the
    plan is cached per (batch class, the operands' other sizes) and never fixes that size.
    """

    def __init__(self, equation: str, batch: str | None = None):
        self.equation = equation
        inputs, self.output = equation.split("->")
        self.inputs = inputs.split(",")
        holders = [i for i, t in enumerate(self.inputs) if batch is not None and batch in t]
        if batch is not None and (len(holders) != 1 or self.inputs[holders[0]].count(batch) != 1):
            raise ValueError(f"batch letter {batch!r} must occur once, in one input of {equation!r}")
        self.batch = batch
        self._batch_at = (holders[0], self.inputs[holders[0]].index(batch)) if holders else None
        self._plans: dict[tuple, tuple[list[Step], Finish | None]] = {}
        self._paths: dict[tuple, list[tuple[int, ...]]] = {}

    # ----------------------------------------------------------------- planning
    def path(self, shapes: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
        """opt_einsum's pairwise order for operands of ``shapes``."""
        key = tuple(tuple(int(d) for d in s) for s in shapes)
        if key not in self._paths:
            dummies = [np.empty(s, dtype=np.float32) for s in key]
            path, _ = opt_einsum.contract_path(self.equation, *dummies, optimize="auto", shapes=False)
            self._paths[key] = [tuple(p) for p in path]
        return self._paths[key]

    def _class_shapes(self, shapes: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
        out = [tuple(int(d) for d in s) for s in shapes]
        if self._batch_at is not None:
            i, d = self._batch_at
            out[i] = out[i][:d] + (batch_class(out[i][d]),) + out[i][d + 1:]
        return tuple(out)

    def plan(self, shapes: Sequence[Sequence[int]]) -> tuple[list[Step], Finish | None]:
        """The steps (and the final permute) for operands of ``shapes``' class, made once."""
        key = self._class_shapes(shapes)
        found = self._plans.get(key)
        if found is None:
            found = self._plans[key] = _compile(self.inputs, self.output, key, self.path(key), self.batch)
        return found

    # ----------------------------------------------------------------- running
    def __call__(self, *operands: torch.Tensor, shape_hint: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        steps, final = self.plan(shape_hint if shape_hint is not None else [o.shape for o in operands])
        ops = list(operands)
        for step in steps:
            step(ops)
        return ops[0] if final is None else final(ops[0])


# --------------------------------------------------------------------------- compiling a path
def _compile(inputs: list[str], output: str, shapes, path, batch: str | None) -> tuple[list[Step], Finish | None]:
    """Turn opt_einsum's ``path`` into :class:`Step`\\ s; each operand is tracked as (letters in
    memory order, the shape it has now) so a reshape is emitted only when the grouping changes."""
    size = {ch: int(n) for t, s in zip(inputs, shapes) for ch, n in zip(t, s)}
    terms = list(inputs)
    now: list[tuple[int, ...]] = [tuple(s) for s in shapes]
    steps = []
    for pair in path:
        picked = tuple(pair)
        rest = [t for k, t in enumerate(terms) if k not in picked]
        remaining = set("".join(rest) + output)
        step = _pair_step(picked, [terms[k] for k in picked], [now[k] for k in picked], remaining, size,
                          batch) if len(picked) == 2 else None
        if step is None:
            step, term, shape = _einsum_step(picked, [terms[k] for k in picked], [now[k] for k in picked],
                                             remaining, size, batch)
        else:
            step, term, shape = step
        for k in sorted(picked, reverse=True):
            terms.pop(k)
            now.pop(k)
        terms.append(term)
        now.append(shape)
        steps.append(step)
    (term,), (shape,) = terms, now
    reshape = None if shape == _natural(term, size) else tuple(_dim(term, size, batch))
    perm = None if term == output else tuple(term.index(c) for c in output)
    return steps, (None if reshape is None and perm is None else Finish(reshape, perm))


def _natural(letters: str, size: dict[str, int]) -> tuple[int, ...]:
    return tuple(size[c] for c in letters)


def _prod(letters: str, size: dict[str, int]) -> int:
    return math.prod(size[c] for c in letters)


def _dim(letters: str, size: dict[str, int], batch: str | None) -> list[int]:
    """Sizes of ``letters``' dimensions, ``-1`` for the batch letter (its size is the call's)."""
    return [-1 if c == batch else size[c] for c in letters]


def _group(letters: str, size: dict[str, int], batch: str | None) -> int:
    """Size of a group of letters, ``-1`` when it holds the batch letter."""
    return -1 if batch is not None and batch in letters else _prod(letters, size)


def _pair_step(picked: tuple[int, int], terms: list[str], shapes: list[tuple[int, ...]], remaining: set[str],
               size: dict[str, int], batch: str | None) -> tuple[Step, str, tuple[int, ...]] | None:
    """The step contracting two operands, its result's letters and (planned) shape (None when a
    matmul cannot do it: see :class:`Step`): which one
    goes left, the contracted letters' order, and each side as a view where its memory allows
    (the copy to avoid is a weight's: at batch 1 the input is the small operand)."""
    (ti, tj), shared = terms, set(terms[0]) & set(terms[1])
    lone = (set(ti) ^ set(tj)) - remaining
    if shared & remaining or lone or len(set(ti)) < len(ti) or len(set(tj)) < len(tj):
        return None
    best = None
    for first, second in ((0, 1), (1, 0)):
        tl, tr = terms[first], terms[second]
        for order in dict.fromkeys("".join(c for c in t if c in shared) for t in (tl, tr)):
            a, cost_a = _side(tl, shapes[first], order, size, batch, left=True)
            for b, cost_b, result in _right_sides(tl, tr, shapes[second], order, size, batch):
                if best is None or cost_a + cost_b < best[0]:
                    best = (cost_a + cost_b, (picked[first], picked[second]), a, b, result)
    _, order_picked, a, b, (term, shape) = best
    return Step(order_picked, a, b), term, shape


def _einsum_step(picked: tuple[int, ...], terms: list[str], shapes: list[tuple[int, ...]], remaining: set[str],
                 size: dict[str, int], batch: str | None) -> tuple[Step, str, tuple[int, ...]]:
    keep = "".join(dict.fromkeys(c for t in terms for c in t if c in remaining))
    unflat = tuple(None if s == _natural(t, size) else tuple(_dim(t, size, batch)) for t, s in zip(terms, shapes))
    return Step(picked, einsum=",".join(terms) + "->" + keep, unflat=unflat), keep, _natural(keep, size)


def _right_sides(tl: str, tr: str, shape: tuple[int, ...], order: str, size, batch):
    """(side, copy cost, (result letters, result shape)) of each way the right operand ``tr`` can
    meet the left matrix: as a (contracted, free) matrix, or, when its memory reads (leading
    free, contracted, trailing free), as a stack of matrices over its leading letters, which the
    small left operand is broadcast against: a TR core ``(r0, n, r1)`` met by the input over
    ``n`` is then used as it lies, where the matrix form would copy it every call. The product
    stays a matrix (or stack): the next step reshapes it to the grouping it needs, if any."""
    free_l = "".join(c for c in tl if c not in order)
    free_r = "".join(c for c in tr if c not in order)
    b, cost = _side(tr, shape, order, size, batch, left=False)
    out = [(b, cost, (free_l + free_r, (_prod(free_l, size), _prod(free_r, size))))]
    at = tr.find(order)
    lead, trail = tr[:at], tr[at + len(order):]
    if at > 0 and trail and not (batch and batch in lead):
        stack = (_group(lead, size, batch), _prod(order, size), _group(trail, size, batch))
        broadcast = _prod(lead, size) * _prod(free_l, size) * _prod(order, size)  # matmul expands the left side
        mat = (_prod(lead, size), _prod(free_l, size), _prod(trail, size))
        out.append((Side(None, None if shape == stack else stack, False), broadcast, (lead + free_l + trail, mat)))
    return out


def _side(term: str, shape: tuple[int, ...], order: str, size, batch, left: bool) -> tuple[Side, int]:
    """``term`` (in memory order, now of ``shape``) as the (free, contracted) matrix of a left
    operand or the (contracted, free) matrix of a right one, with the contracted letters in
    ``order``; the cost is the elements a copy would move (0 for a view)."""
    free = "".join(c for c in term if c not in order)
    want, flipped = (free + order, order + free) if left else (order + free, free + order)
    groups = ((free, order) if left else (order, free))
    mat = tuple(_group(g, size, batch) for g in groups)
    flip_mat = mat[::-1]
    if term == want:
        return Side(None, None if _matches(shape, mat) else mat, False), 0
    if term == flipped:
        return Side(None, None if _matches(shape, flip_mat) else flip_mat, True), 0
    perm = tuple(term.index(c) for c in want)
    unflat = None if shape == _natural(term, size) else tuple(_dim(term, size, batch))
    return Side(perm, mat, False, unflat), _prod(term, size)


def _matches(shape: tuple[int, ...], mat: tuple[int, ...]) -> bool:
    return len(shape) == len(mat) and all(m == -1 or s == m for s, m in zip(shape, mat))
