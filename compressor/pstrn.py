"""``pstrn``: PSTRN's progressive genetic search over ring ranks, the comparator of the paper.

PSTRN (Li et al., 2021, "Heuristic Rank Selection with Progressively Searching Tensor Ring
Network") searches every bond's rank with a genetic algorithm whose range shrinks around the
best candidates found (the *interest region*), each candidate trained briefly and scored.
What the paper leaves out, read from the authors' code (NSGA-Net's GA on pymoo):

* a genome holds one *code* in 1..5 per bond; its rank is ``code x spacing + offset``
  (at least 2 there: their ranks start from scratch; 1 here, where the cores start from the
  pretrained weights' TT-SVD);
* three phases with spacings 5, 2, 1: ranks 5..25 first, then five ranks two apart, then one
  apart, each phase centred per bond on the code most of the last phase's 5 best share;
* a population of 30, binary tournament selection, two-point crossover, polynomial
  mutation of the integer codes (eta 3, one gene in ``n`` on average), duplicates eliminated,
  survival of the best; 1,500 + 900 + the rest of 3,000 candidates over the phases;
* each candidate trained from scratch for 20 epochs and scored by its best validation accuracy.

What this implementation changes, and why:

* **The range is centred on the target**, not set by hand: phase 1's centre is the uniform
  rank that meets the target (``uniform``'s), its spacing a third of that (PSTRN's 15 and 5),
  then two fifths and one fifth of it (5, 2, 1). Later phases start from a fresh population in
  the new region plus its centre (PSTRN reinterprets the old codes under the new grid and keeps
  their stale scores).
* **Every candidate meets the target.** PSTRN traded accuracy against compression (two
  objectives); a run here has one size target, so a candidate over it is cut down, the largest
  bond first, until it fits, and one past the target by more than 2 % is grown back towards it
  (``fit_to_target``). Every candidate trained is one the run could deliver, and the winner's
  ratio is at least the target and close to it.
* **The evaluation budget is the run's.** A run's budget is the steps ``l0`` would take
  (``epochs`` or the default budget). The search gets the share ``l0``'s gate phase gets
  (``gate_fraction``, a half): :data:`TRIAL_STEPS` steps per candidate, so the budget's
  share / 5 candidates (between :data:`MIN_CANDIDATES` and :data:`MAX_CANDIDATES`; the
  steps per candidate grow beyond that), split evenly over the three phases. The winner is
  then fine-tuned ungated (like ``uniform``) for the rest: search and fine-tune together train
  exactly the steps ``l0``'s run trains. On LeNet-5 with the frontier's 2 epochs (938 steps)
  that is 90 candidates of 5 steps, then 488 fine-tune steps; PSTRN itself trained 3,000
  candidates for 20 epochs each.
* **Candidates start from the pretrained weights** (the TT-SVD every selector here starts
  from) and are scored by their task loss on batches held back from their training
  (:func:`compressor.trials.candidate_trial`), not by test accuracy: a run has no validation
  split of its own, and the test data stays out of the choice.

The same seed gives the same candidates, scores and ranks: the GA draws from its own
``random.Random(seed)`` and every trial from a seeded, restored torch stream. A time budget
counts the search's seconds (they come before the fine-tune), so it is the fine-tune it cuts.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from torch import nn

from . import tensornet as tn
from .errors import ConfigError, TargetError
from .plan import CompressionPlan, Ranks, StartFactors, plan_modes, plan_params, planned_starts
from .selectors import Prepared, RankSelector, Search, SelectorOptions, uniform_ranks

#: Optimiser steps each candidate is trained before it is scored (PSTRN: 20 epochs from scratch).
TRIAL_STEPS = 5
#: Candidates a search trains, at least and at most (more budget: more steps per candidate).
MIN_CANDIDATES, MAX_CANDIDATES = 12, 90
#: PSTRN's population, codes per bond, and best candidates whose common code centres a phase.
POPULATION, LEVELS, ELITES = 30, 5, 5
#: Each phase's spacing as a share of the uniform rank (PSTRN's 5, 2, 1 around 15).
SPACINGS = (1 / 3, 2 / 15, 1 / 15)
#: How far past the target (a share of it) a candidate may land before it is grown back towards it.
SLACK = 0.02
#: New children tried before a duplicate is accepted (and trained again) in a small space.
RETRIES = 20


def search_shape(budget: int) -> tuple[int, int]:
    """(candidates, steps each) of a search with ``budget`` steps: :data:`TRIAL_STEPS` each,
    as many candidates as that allows within [:data:`MIN_CANDIDATES`, :data:`MAX_CANDIDATES`]
    (too small a budget: fewer steps each, down to scoring untrained starts)."""
    candidates = min(MAX_CANDIDATES, max(MIN_CANDIDATES, budget // TRIAL_STEPS))
    return candidates, budget // candidates


@dataclass(frozen=True)
class Bond:
    """One gene: a bond of a planned layer, its index among the layer's bonds and its cap."""

    layer: str
    index: int
    cap: int


def searched_bonds(the_plan: CompressionPlan, decomp: str) -> list[Bond]:
    """Every bond whose rank the search chooses (not a train's closing bond, nor the layers
    with a rank set by the user), with the largest size it may take (``tn.resolve_ranks``'s)."""
    bonds = []
    for lp in the_plan.layers:
        if lp.rank is not None:
            continue
        modes = plan_modes(lp)
        caps = tn.resolve_ranks([10 ** 9] * len(modes), modes, decomp)
        bonds += [Bond(lp.name, k, caps[k]) for k in range(len(modes) if decomp == "tr" else len(modes) - 1)]
    return bonds


class RankSpace:
    """The search's rank arithmetic: codes to ranks in a phase's grid, and a model's size."""

    def __init__(self, the_plan: CompressionPlan, options: SelectorOptions):
        self.plan, self.decomp, self.target = the_plan, options.decomp, options.target
        self.bonds = searched_bonds(the_plan, options.decomp)
        if not self.bonds:
            raise ConfigError("rank selector 'pstrn' has no bond to search: every layer's rank is set")
        uniform = uniform_ranks(the_plan, options.target, options.decomp)
        self.first_centre = tuple(uniform[b.layer][b.index] for b in self.bonds)

    def grid(self, centre: tuple[int, ...], phase: int) -> list[list[int]]:
        """Each bond's :data:`LEVELS` ranks in ``phase``: ``centre`` +- whole spacings, within [1, cap]."""
        out = []
        for bond, c, first in zip(self.bonds, centre, self.first_centre):
            spacing = max(1, round(first * SPACINGS[phase]))
            out.append([min(bond.cap, max(1, c + (level - LEVELS // 2) * spacing)) for level in range(LEVELS)])
        return out

    def ranks_of(self, ranks: tuple[int, ...]) -> dict[str, Ranks]:
        """Every planned layer's bonds: the searched ones at ``ranks``, the rest as planned."""
        out: dict[str, Ranks] = {}
        for lp in self.plan.layers:
            modes = plan_modes(lp)
            out[lp.name] = lp.rank if lp.rank is not None else tn.resolve_ranks(1, modes, self.decomp)
        for bond, r in zip(self.bonds, ranks):
            out[bond.layer][bond.index] = r
        return out

    def ratio(self, ranks: tuple[int, ...]) -> float:
        return self.plan.dense_params / plan_params(self.plan, self.ranks_of(ranks), self.decomp)

    def fits(self, ranks: tuple[int, ...]) -> bool:
        return self.ratio(ranks) >= self.target

    def fit_to_target(self, ranks: tuple[int, ...]) -> tuple[int, ...]:
        """``ranks`` cut down until the model meets the target (the largest bond first, the first
        of equals, one slice at a time), then, when it lies past the target by more than
        :data:`SLACK`, grown back towards it (the smallest bond that still fits first): a run asked
        for 100x gets about 100x, not the 105x a coarse grid of small ranks lands on."""
        cut = list(ranks)
        while not self.fits(tuple(cut)):
            widest = max(range(len(cut)), key=lambda i: (cut[i], -i))
            if cut[widest] == 1:
                raise TargetError(f"no ranks of the searched bonds reach {self.target:g}x")
            cut[widest] -= 1
        while self.ratio(tuple(cut)) > self.target * (1 + SLACK):
            for i in sorted(range(len(cut)), key=lambda i: (cut[i], i)):
                if cut[i] < self.bonds[i].cap and self.fits(tuple(cut[:i] + [cut[i] + 1] + cut[i + 1:])):
                    cut[i] += 1
                    break
            else:
                break  # no bond grows without passing the target
        return tuple(cut)


@dataclass(frozen=True)
class Candidate:
    """A genome (codes), the ranks it stands for once fitted to the target, and its score."""

    codes: tuple[int, ...]
    ranks: tuple[int, ...]
    loss: float
    order: int  # when it was trained: ties go to the earlier one

    @property
    def key(self) -> tuple[float, int]:
        return (self.loss, self.order)


class ProgressiveSearch:
    """One PSTRN search: phases of a GA over codes, each in a narrower grid around the last's elites."""

    def __init__(self, space: RankSpace, search: Search, options: SelectorOptions):
        self.space, self.search, self.options = space, search, options
        self.candidates, self.steps = search_shape(search.budget)
        self.rng = random.Random(search.seed)
        self.tried: list[Candidate] = []
        self.seen: set[tuple[int, ...]] = set()

    def run(self) -> Candidate:
        """The best candidate of all phases (the lowest loss, the earliest of equals)."""
        centre, left = self.space.first_centre, self.candidates
        for phase in range(len(SPACINGS)):
            share = left // (len(SPACINGS) - phase)
            left -= share
            grid = self.space.grid(centre, phase)
            found = self._phase(grid, share)
            elites = sorted(found, key=lambda c: c.key)[:ELITES]
            common = [Counter(c.codes[g] for c in elites).most_common(1)[0][0] for g in range(len(grid))]
            centre = tuple(grid[g][code] for g, code in enumerate(common))
        return min(self.tried, key=lambda c: c.key)

    def _phase(self, grid: list[list[int]], share: int) -> list[Candidate]:
        """``share`` candidates in ``grid``: its centre and random genomes, then generations
        of children of the best (binary tournaments, two-point crossover, mutation)."""
        size = min(POPULATION, max(2, share // 2), share)
        centre = tuple([LEVELS // 2] * len(grid))  # the last phase's elites' common ranks, unless trained already
        population = [self._train(grid, centre)] if self._ranks(grid, centre) not in self.seen else []
        while len(population) < size:  # one at a time: each new genome is checked against those just trained
            population.append(self._train(grid, self._fresh(grid, lambda: tuple(self.rng.randrange(LEVELS)
                                                                                  for _ in grid))))
        found = list(population)
        while len(found) < share:
            children = [self._train(grid, self._fresh(grid, lambda: self._child(population)))
                        for _ in range(min(size, share - len(found)))]
            found += children
            population = sorted(population + children, key=lambda c: c.key)[:size]
        return found

    def _fresh(self, grid: list[list[int]], draw: Callable[[], tuple[int, ...]]) -> tuple[int, ...]:
        """A genome from ``draw()`` whose ranks were not trained yet (after :data:`RETRIES`, any)."""
        for _ in range(RETRIES):
            codes = draw()
            if self._ranks(grid, codes) not in self.seen:
                return codes
        return codes

    def _child(self, population: list[Candidate]) -> tuple[int, ...]:
        """Two tournament winners crossed at two points, then each code moved with chance 1/n."""
        a, b = (self._tournament(population).codes for _ in range(2))
        n = len(a)
        i, j = sorted(self.rng.sample(range(n + 1), 2)) if n > 1 else (0, n)
        child = list(a[:i] + b[i:j] + a[j:])
        for g in range(n):
            if self.rng.random() < 1 / n:  # small moves likelier, as polynomial mutation's eta 3
                child[g] += self.rng.choice((-2, -1, -1, 1, 1, 2))
                child[g] = min(LEVELS - 1, max(0, child[g]))
        return tuple(child)

    def _tournament(self, population: list[Candidate]) -> Candidate:
        if len(population) == 1:
            return population[0]
        a, b = self.rng.sample(population, 2)
        return min(a, b, key=lambda c: c.key)

    def _ranks(self, grid: list[list[int]], codes: tuple[int, ...]) -> tuple[int, ...]:
        return self.space.fit_to_target(tuple(grid[g][c] for g, c in enumerate(codes)))

    def _train(self, grid: list[list[int]], codes: tuple[int, ...]) -> Candidate:
        """Train and score the candidate ``codes`` stands for (``steps`` steps, the run's trial)."""
        ranks = self._ranks(grid, codes)
        starts = planned_starts(self.space.plan, self.options.decomp, self.space.ranks_of(ranks))
        loss = self.search.trial(starts, self.steps)
        found = Candidate(codes, ranks, loss if math.isfinite(loss) else math.inf, len(self.tried))
        self.tried.append(found)
        self.seen.add(ranks)
        return found


class PSTRNSelector(RankSelector, name="pstrn"):
    help = ("PSTRN (Li et al., 2021): a progressive genetic search over ring ranks, each candidate briefly "
            "trained, in half the budget; the winner fine-tuned ungated for the rest")
    searches = True

    def search_steps(self, budget: int) -> int:
        candidates, steps = search_shape(budget)
        return candidates * steps

    def prepare(self, the_plan: CompressionPlan, module: nn.Module, options: SelectorOptions,
                whiten: StartFactors | None = None, search: Search | None = None) -> Prepared:
        """The winner of a :class:`ProgressiveSearch` with ``search``'s trial and budget, every layer
        in its own layout (a user's rank kept). Without ``search`` (``prepare`` called outside a
        run, which alone has the data to train candidates on) it is a ConfigError."""
        if search is None:
            raise ConfigError("rank selector 'pstrn' trains candidates to choose: run it through compress()")
        space = RankSpace(the_plan, options)
        best = ProgressiveSearch(space, search, options).run()
        return Prepared(planned_starts(the_plan, options.decomp, space.ranks_of(best.ranks)))
