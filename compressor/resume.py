"""Interrupt and resume: what a resumable state holds, how it is written, checked and read.

A compression run on a transformer takes hours; a laptop lid, a Ctrl-C or a preempted
job must not cost them. The fine-tune saves its whole state (model, gates, optimisers,
controller, data position (:class:`Position`), random state) every ``checkpoint_every``
steps and when asked to stop, and a resumed run replays exactly the steps that were left:
same random draws, same batches, same decisions, so it ends where the uninterrupted run
would have.

The file is ``torch.save``'s zip of tensors and plain containers, written atomically and
read back with ``weights_only=True``: a state file from elsewhere cannot run code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import signal
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CompressorError, first_line
from .files import atomic_write, require_file
from .surgery import replace_module, tn_layers

log = logging.getLogger(__name__)

FORMAT = "compressor-resume"
VERSION = 1
#: Config fields that may differ between a run and its resumption (they change no result;
#: a run saved on one device may go on on another).
NOT_IN_FINGERPRINT = ("filter_fn", "forward_fn", "log_every", "checkpoint_every", "device")


class ResumeError(CompressorError):
    """A state file is missing, damaged, or belongs to a different run."""


class RunInterrupted(KeyboardInterrupt):
    """The run stopped at a step boundary on request (Ctrl-C or SIGTERM); its state is saved.

    A ``KeyboardInterrupt``, so code that already handles Ctrl-C keeps working; it also
    says where the state is and how far the run got.
    """

    def __init__(self, step: int, total: int, state_file: Path, signum: int = signal.SIGINT):
        self.step, self.total, self.state_file, self.signum = step, total, Path(state_file), signum
        super().__init__(f"interrupted at step {step} of {total}; the run's state is saved in {state_file}")

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM)."""
        return 128 + int(self.signum)


class StopRequest:
    """While active, Ctrl-C (SIGINT) and SIGTERM ask the run to stop at the next step boundary.

    Stopping mid-step would save a half-updated model; so the first signal only raises a
    flag the training loop reads between steps. A second signal is an insistent user: the
    previous handler is restored and a plain ``KeyboardInterrupt`` stops at once (the last
    periodic state stays on disk). Signal handlers can only be set from the main thread;
    elsewhere this does nothing and Ctrl-C behaves as usual.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            self._restore()
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("stop requested: the run will save its state after the current step")

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> "StopRequest":
        if self.enabled:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()


# ------------------------------------------------------------------ identity of a run
def fingerprint(config: Any, **facts: Any) -> dict[str, Any]:
    """What makes two runs the same run: every result-changing option plus facts of the
    model and data (``facts``: total steps, batches per epoch, planned layers...)."""
    options = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in NOT_IN_FINGERPRINT}
    return json.loads(json.dumps({"config": options, **facts}, sort_keys=True, default=repr))


def _first_difference(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> str | None:
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key} is {b!r} now but {a!r} in the saved run"
    return None


# ------------------------------------------------------------------ random state
def rng_state() -> dict[str, Any]:
    """Every random generator a step may draw from (gate noise, dropout, user code)."""
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


@contextlib.contextmanager
def random_state_kept() -> Iterator[None]:
    """Run a block (a side measurement) without moving any generator the run draws from."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


# ------------------------------------------------------------------ where a run is
@dataclass
class Position:
    """Where a run is between two steps, and how a resumed run gets back into its epoch."""

    step: int = 0  # optimiser steps taken
    epoch: int = 0  # the epoch under way (1 for the first)
    batch_in_epoch: int = 0  # batches of it already trained on
    epoch_rng: dict[str, Any] | None = None  # the random state as it began
    resume_rng: dict[str, Any] | None = None  # a resumed run's random state at the step it stopped at

    def epoch_batches(self, loader: Iterable) -> tuple[Iterator, bool]:
        """The batches of the next epoch, or of the interrupted one from where it stopped, and
        whether the epoch is new.

        The loader is told the epoch (``set_epoch``, as for a DistributedSampler), so its
        order depends on the epoch alone. A resumed epoch replays the random state the
        epoch began with, draws the batches already trained on without using them, then
        takes the random state of the step it stopped at: the same batches in the same
        order as the uninterrupted run, whatever shuffles the loader does.
        """
        resume, self.resume_rng = self.resume_rng, None
        if resume is None:
            self.epoch += 1
            self.batch_in_epoch = 0
            self.epoch_rng = rng_state()
        else:
            set_rng_state(self.epoch_rng)
        set_loader_epoch(loader, self.epoch - 1)
        batches = iter(loader)
        for _ in range(self.batch_in_epoch if resume is not None else 0):
            if next(batches, None) is None:
                raise ResumeError("the data loader gives fewer batches than when the state was saved")
        if resume is not None:
            set_rng_state(resume)
        return batches, resume is None

    def state_dict(self) -> dict[str, Any]:
        """The position, and the random state of this step boundary (taken now)."""
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "epoch_rng": self.epoch_rng, "rng": rng_state()}

    @classmethod
    def saved(cls, state: dict[str, Any]) -> "Position":
        """A saved run's position; its next epoch is the one it stopped in (states are saved
        inside an epoch, never before the first)."""
        return cls(state["step"], state["epoch"], state["batch_in_epoch"], state["epoch_rng"], state["rng"])


def set_loader_epoch(loader: Iterable, epoch: int) -> None:
    """Tell a loader (or its DistributedSampler-like sampler) which epoch it serves."""
    for obj in (loader, getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if obj is not None and callable(getattr(obj, "set_epoch", None)):
            obj.set_epoch(epoch)
            return


# ------------------------------------------------------------------ the file
def save_state(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically: a crash (even ``kill -9``) leaves the previous file or none."""
    payload = {"format": FORMAT, "version": VERSION, **state}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_state(path: str | Path) -> dict[str, Any]:
    """A saved state, read without unpickling code; any damage is one ``ResumeError`` line."""
    p = require_file(path, ResumeError, "state file")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ResumeError(f"state file {p} cannot be read ({first_line(exc, 200)}); start the run over "
                          "without resuming") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ResumeError(f"{p} is not a compressor state file")
    if state.get("version") != VERSION:
        raise ResumeError(f"state file {p} has format version {state.get('version')}; this compressor reads "
                          f"version {VERSION}")
    return state


def check_same_run(state: dict[str, Any], current: dict[str, Any], path: str | Path) -> None:
    """Refuse to resume a state made with other options, model or data (it would silently mix runs)."""
    difference = _first_difference(state.get("fingerprint", {}), current)
    if difference is not None:
        raise ResumeError(f"the state in {path} belongs to a different run ({difference}); resume with the "
                          "same model, data and options, or start over without resuming")


# ------------------------------------------------------------------ model structure
def restore_model(model: nn.Module, saved: dict[str, torch.Tensor], kept_dense: list[str]) -> None:
    """Load a saved run's model state into a freshly built gated ``model`` (pruned and partly
    dense again first, as the saved one was); a state that does not fit is one ``ResumeError``."""
    try:
        restore_structure(model, saved, kept_dense)
        model.load_state_dict(saved)
    except (KeyError, RuntimeError) as exc:
        raise ResumeError(f"the saved model does not fit this run ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]})") from None


def restore_structure(model: nn.Module, saved: dict[str, torch.Tensor], kept_dense: list[str]) -> None:
    """Give a freshly built gated model the shape the saved one had, so its state loads.

    After the gates froze, the saved model's layers were pruned (narrower cores, no gates)
    and some went back to dense; rebuilding that from the state's own tensor shapes needs
    no knowledge of how the run decided it.
    """
    for name in kept_dense:
        replace_module(model, name, tn_layers(model)[name].to_dense())
    for name, layer in tn_layers(model).items():
        if layer.gates is not None and not any(k.startswith(f"{name}.gates.") for k in saved):
            layer.gates = None
        dtype = layer.cores[0].dtype
        shapes = [saved[f"{name}.cores.{k}"].shape for k in range(len(layer.cores))]
        if any(tuple(s) != tuple(c.shape) for s, c in zip(shapes, layer.cores)):
            layer.cores = nn.ParameterList([nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes])
