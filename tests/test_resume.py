"""Interrupt and resume with real signals: a resumed run ends exactly where the uninterrupted one does."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from compressor import compress
from compressor.cli import main
from compressor.data import TensorLoader
from compressor.errors import ConfigError
from compressor.resume import ResumeError, RunInterrupted, load_state

ROOT = Path(__file__).resolve().parent.parent
RUN = dict(decomp="tr", target="6x", epochs=4, log_every=1)  # 4 x 23 = 92 steps on digits, gates freeze mid-run


def loaders(digits):
    xtr, ytr, xte, yte = digits
    return TensorLoader(xtr, ytr, 64, shuffle=True, seed=0), TensorLoader(xte, yte, 256)


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def uninterrupted(trained_digits_net, digits):
    train, test = loaders(digits)
    return compress(trained_digits_net, train, eval_loader=test, **RUN)


def interrupt_at(step):
    """A progress callback that sends this process a real SIGINT after optimiser step ``step``."""
    def callback(event):
        if event.kind == "step" and event.step == step:
            os.kill(os.getpid(), signal.SIGINT)
    return callback


@pytest.mark.parametrize("stop_at", [5, 60])  # inside the gate phase; after the gates froze and pruned
def test_sigint_then_resume_gives_the_uninterrupted_result(trained_digits_net, digits, uninterrupted, tmp_path,
                                                           stop_at):
    assert 5 < uninterrupted.history.frozen_at < 60  # the two cases really are before and after the freeze
    state = tmp_path / "run.resume.pt"
    train, test = loaders(digits)
    with pytest.raises(RunInterrupted) as stopped:
        compress(trained_digits_net, train, eval_loader=test, callback=interrupt_at(stop_at), state_file=state, **RUN)
    assert stopped.value.step == stop_at and stopped.value.exit_code == 130 and state.exists()

    steps = []
    train, test = loaders(digits)
    resumed = compress(trained_digits_net, train, eval_loader=test, state_file=state, resume=True,
                       callback=lambda e: steps.append(e.step) if e.kind == "step" else None, **RUN)
    total = uninterrupted.report.steps
    assert steps == list(range(stop_at + 1, total + 1))  # only the remaining steps, counter continued
    assert resumed.report.resumed_from == stop_at and resumed.report.steps == total
    assert [l.final_ranks for l in resumed.report.layers] == [l.final_ranks for l in uninterrupted.report.layers]
    assert resumed.report.accuracy == uninterrupted.report.accuracy
    assert resumed.report.ratio == uninterrupted.report.ratio
    assert resumed.history.frozen_at == uninterrupted.history.frozen_at
    assert same_state(resumed.model, uninterrupted.model)  # bit for bit, not merely close


def test_periodic_states_and_only_remaining_steps(trained_digits_net, digits, uninterrupted, tmp_path):
    state = tmp_path / "s.pt"
    train, test = loaders(digits)
    compress(trained_digits_net, train, eval_loader=test, state_file=state, checkpoint_every=25, **RUN)
    saved = load_state(state)
    assert saved["step"] == 75  # the last multiple of 25 before the end (92 steps)
    train, test = loaders(digits)
    resumed = compress(trained_digits_net, train, eval_loader=test, state_file=state, resume=True, **RUN)
    assert resumed.report.resumed_from == 75 and same_state(resumed.model, uninterrupted.model)


def test_resume_refuses_another_run(trained_digits_net, digits, tmp_path):
    state = tmp_path / "s.pt"
    train, test = loaders(digits)
    with pytest.raises(RunInterrupted):
        compress(trained_digits_net, train, callback=interrupt_at(3), state_file=state, **RUN)
    with pytest.raises(ResumeError, match="target is 8.0 now but 6.0 in the saved run"):
        compress(trained_digits_net, train, state_file=state, resume=True, **{**RUN, "target": "8x"})
    with pytest.raises(ResumeError, match="batches_per_epoch"):
        compress(trained_digits_net, TensorLoader(digits[0], digits[1], 32, shuffle=True), state_file=state,
                 resume=True, **RUN)


def test_bad_state_files(trained_digits_net, digits, tmp_path):
    train, _ = loaders(digits)
    with pytest.raises(ConfigError, match="state_file"):
        compress(trained_digits_net, train, checkpoint_every=10, **RUN)
    with pytest.raises(ResumeError, match="does not exist"):
        compress(trained_digits_net, train, state_file=tmp_path / "none.pt", resume=True, **RUN)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(1000))
    with pytest.raises(ResumeError, match="cannot be read"):
        compress(trained_digits_net, train, state_file=junk, resume=True, **RUN)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ResumeError, match="not a compressor state file"):
        compress(trained_digits_net, train, state_file=other, resume=True, **RUN)


class _Payload:
    """Pickled into a state file: unpickling it would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_state_file_cannot_run_code(trained_digits_net, digits, tmp_path):
    marker, hostile = tmp_path / "pwned", tmp_path / "hostile.pt"
    torch.save({"format": "compressor-resume", "version": 1, "x": _Payload(marker)}, hostile)
    train, _ = loaders(digits)
    with pytest.raises(ResumeError, match="cannot be read"):
        compress(trained_digits_net, train, state_file=hostile, resume=True, **RUN)
    assert not marker.exists()


# ------------------------------------------------------------------ the command, with real signals
CLI_RUN = ["--data", "digits", "--target", "6x", "--epochs", "4", "--batch-size", "64", "--seed", "0"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, trained_digits_net, digits):
    path = tmp_path_factory.mktemp("resume") / "digits.pt2"
    ep = torch.export.export(trained_digits_net, (digits[2][:4].clone(),),
                             dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(ep, str(path))
    return path


@pytest.fixture(scope="module")
def cli_reference(model_file, tmp_path_factory):
    """The uninterrupted command's checkpoint and report."""
    out = tmp_path_factory.mktemp("ref")
    r = CliRunner().invoke(main, [str(model_file), *CLI_RUN, "-o", str(out / "slim.safetensors"),
                                  "--report-json", str(out / "report.json")])
    assert r.exit_code == 0, r.output
    return load_file(str(out / "slim.safetensors")), json.loads((out / "report.json").read_text())


def start(args, cwd):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "compressor", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, proc, before=None, timeout=120):
    """Until ``path`` exists (with another modification time than ``before``: a step was saved)."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_mtime_ns != before):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} was never written"
        time.sleep(0.005)


def assert_same_result(out, reference):
    tensors, report = reference
    mine = load_file(str(out / "slim.safetensors"))
    assert mine.keys() == tensors.keys() and all(torch.equal(mine[k], tensors[k]) for k in mine)
    got = json.loads((out / "report.json").read_text())
    assert [l["final_ranks"] for l in got["layers"]] == [l["final_ranks"] for l in report["layers"]]
    assert round(100 * got["accuracy"], 2) == round(100 * report["accuracy"], 2)
    assert got["steps"] == report["steps"] and got["ratio"] == report["ratio"]
    return got


def test_ctrl_c_saves_and_resume_finishes_the_same(model_file, cli_reference, tmp_path):
    out = tmp_path / "out"
    args = [model_file, *CLI_RUN, "-o", out / "slim.safetensors", "--report-json", out / "report.json",
            "--checkpoint-every", "10"]
    proc = start(args, tmp_path)
    state = out / "slim.resume.pt"
    wait_for(state, proc)  # step 10 is done: the run is mid-training
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and str(state) in err and "Traceback" not in err
    stopped_at = load_state(state)["step"]
    assert 10 <= stopped_at < cli_reference[1]["steps"]
    assert not (out / "slim.safetensors").exists() and not (out / "report.json").exists()

    again = CliRunner().invoke(main, list(map(str, args)))  # without --resume: refuses to drop the state
    assert again.exit_code == 2 and "--resume" in again.stderr and state.exists()

    proc = start(args + ["--resume"], tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    got = assert_same_result(out, cli_reference)
    assert got["resumed_from"] == stopped_at
    assert not state.exists()  # the result is written: nothing left to resume
    assert not list(out.glob(".*.tmp"))


def test_kill_9_leaves_no_partial_output(model_file, cli_reference, tmp_path):
    out = tmp_path / "out"
    args = [model_file, *CLI_RUN, "-o", out / "slim.safetensors", "--report-json", out / "report.json",
            "--checkpoint-every", "1"]  # a state written every step: kills land mid-write
    state = out / "slim.resume.pt"
    rng = random.Random(0)
    for attempt in range(3):
        before = state.stat().st_mtime_ns if state.exists() else None
        proc = start(args + (["--resume"] if before is not None else []), tmp_path)
        wait_for(state, proc, before)  # training is under way ...
        time.sleep(rng.uniform(0.0, 0.03))  # ... and the kill lands at some moment of a step or a write
        proc.kill()
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
        assert visible == ["slim.resume.pt"], visible  # no checkpoint or report, whole or partial
        load_state(state)  # the state that is there is complete
    proc = start(args + ["--resume"], tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert_same_result(out, cli_reference)
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "slim.safetensors"]  # temporaries swept
