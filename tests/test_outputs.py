"""Outputs fail early, never fight each other, and never overwrite an input.

Before: an unwritable output failed with a traceback after the whole run (and left empty
folders); a full disk at the end lost the training; a second run swept the first one's live
temporaries and silently replaced its finished file; ``-o`` equal to ``--data`` overwrote the
training data with ``--force``; a FIFO blocked forever; outputs were mode 0600 whatever the
umask; ``-o newdir/`` wrote a file named ``newdir``.
"""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from compressor import cli
from compressor.cli import main
from compressor.errors import ModelError
from compressor.files import OutputAppeared, atomic_write, probe_writable, stale_temporaries, staged_outputs, temporary_for

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--target", "4x", "--epochs", "1", "--batch-size", "64"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, trained_digits_net, digits):
    d = tmp_path_factory.mktemp("outputs")
    save_file({k: v.contiguous() for k, v in trained_digits_net.state_dict().items()}, str(d / "weights.safetensors"))
    xtr, ytr, xte, yte = digits
    save_file({"inputs": xtr[:512].contiguous(), "labels": ytr[:512].contiguous()}, str(d / "data.safetensors"))
    save_file({"inputs": xte[:128].contiguous(), "labels": yte[:128].contiguous()}, str(d / "held.safetensors"))
    return d


def run_args(files, *extra):
    return [str(files / "weights.safetensors"), "--arch", "compressor.zoo:digits_net", "--data",
            str(files / "data.safetensors"), *QUICK, *map(str, extra)]


def invoke(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(result):
    """The one ``error:`` line of a failed run (progress lines may come before it)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    assert "Traceback" not in result.output + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    return errors[0]


def quick_error(result):
    """A failure before any work: the error line is all there is."""
    line = error_line(result)
    assert result.stderr.strip() == line, result.stderr
    return line


# ------------------------------------------------------------------ writable before any work
def test_an_output_that_cannot_be_written_fails_before_any_work(files, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = tmp_path / "slim.safetensors"
    line = quick_error(invoke(run_args(files, "-o", blocker / "slim.safetensors")))  # before: traceback after the run
    assert "cannot write" in line and str(blocker / "slim.safetensors") in line
    line = quick_error(invoke(run_args(files, "-o", out, "--report-json", blocker / "report.json")))
    assert "cannot write" in line and "report.json" in line
    assert not out.exists() and blocker.read_text() == "not a folder"


def test_a_failed_run_leaves_no_empty_folders(files, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    nested = tmp_path / "new" / "deeper"
    quick_error(invoke(run_args(files, "-o", nested / "slim.safetensors", "--report-json", blocker / "r.json")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # before: new/deeper/ was left behind
    with pytest.raises(ModelError, match="cannot write"):
        probe_writable(blocker / "deeper" / "x.safetensors", ModelError)
    probe_writable(tmp_path / "one" / "two" / "x.safetensors", ModelError)  # writable: made, probed, removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    with pytest.raises(RuntimeError):
        with staged_outputs([tmp_path / "three" / "x.bin"]) as staged:
            staged[tmp_path / "three" / "x.bin"].write_bytes(b"half")
            raise RuntimeError("the export failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    """A run's checkpoint, written without trouble."""
    out = tmp_path_factory.mktemp("reference") / "slim.safetensors"
    assert invoke(run_args(files, "-o", out)).exit_code == 0
    return load_file(str(out))


def _full_disk(result, path, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def _torch_full_disk(result, path, **kwargs):  # what torch.save says on a full disk
    raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file")


@pytest.mark.parametrize("failure, said", [(_full_disk, "No space left on device"),
                                           (_torch_full_disk, "RuntimeError: [enforce fail")])
def test_a_write_failure_at_the_end_keeps_the_trained_run(files, reference, tmp_path, monkeypatch, failure, said):
    out, report = tmp_path / "out" / "slim.safetensors", tmp_path / "out" / "report.json"
    state = out.with_suffix(".resume.pt")
    monkeypatch.setattr(cli, "save", failure)
    line = error_line(invoke(run_args(files, "-o", out, "--report-json", report)))  # before: a traceback
    assert said in line and str(state) in line and "--resume" in line
    assert failure is not _full_disk or f"could not write {out} " in line  # the output, not its temporary
    assert state.exists() and not out.exists() and not report.exists()
    monkeypatch.undo()
    resumed = invoke(run_args(files, "-o", out, "--report-json", report, "--resume"))
    assert resumed.exit_code == 0, resumed.stderr
    got = json.loads(report.read_text())
    assert got["resumed_from"] == got["steps"]  # no step trained again
    mine, theirs = load_file(str(out)), reference
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert not state.exists()


# ------------------------------------------------------------------ two runs, one output
def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_sweep_spares_temporaries_whose_writer_still_runs(tmp_path):
    out = tmp_path / "slim.safetensors"
    mine = temporary_for(out)  # this process's: alive
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        theirs = tmp_path / f".slim.safetensors.{live.pid}-abcd1234.tmp"
        dead = tmp_path / f".slim.safetensors.{_dead_pid()}-abcd1234.tmp"
        old_style = tmp_path / ".slim.safetensors.k2j4h5g6.tmp"  # no pid: a writer from before pids
        other_output = tmp_path / ".slim.safetensors.report.123-abcd1234.tmp"  # not this output's
        for f in (theirs, dead, old_style, other_output):
            f.write_bytes(b"")
        assert stale_temporaries(out) == sorted([dead, old_style])  # before: all five
        r = invoke(["digits-model-that-is-missing.pt", "--target", "4x", "--data", "digits", "-o", out])
        assert "does not exist" in quick_error(r)
        assert mine.exists() and theirs.exists() and other_output.exists()  # a live run keeps its files
        assert not dead.exists() and not old_style.exists()
    finally:
        live.kill()
        live.wait()


def test_an_output_another_run_finished_meanwhile_is_not_replaced(files, tmp_path, monkeypatch):
    out = tmp_path / "slim.safetensors"
    real_compress = cli.compress

    def the_other_run_finishes_first(*args, **kwargs):
        result = real_compress(*args, **kwargs)
        out.write_bytes(b"the other run's model")
        return result

    monkeypatch.setattr(cli, "compress", the_other_run_finishes_first)
    line = error_line(invoke(run_args(files, "-o", out)))  # before: silently replaced
    assert "appeared while this run was going" in line and "--resume --force" in line
    assert out.read_bytes() == b"the other run's model"
    assert out.with_suffix(".resume.pt").exists()
    assert not list(tmp_path.glob(".*.tmp"))
    forced = invoke(run_args(files, "-o", out, "--force"))  # what --force asks for
    assert forced.exit_code == 0, forced.stderr
    assert out.read_bytes() != b"the other run's model"


def test_staged_outputs_take_no_name_someone_else_took(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    with pytest.raises(OutputAppeared):
        with staged_outputs([a, b], overwrite=False) as staged:
            staged[a].write_bytes(b"mine")
            staged[b].write_bytes(b"mine")
            b.write_bytes(b"theirs")  # another run renames its result into place
    assert not a.exists() and b.read_bytes() == b"theirs"  # all or nothing, theirs kept
    assert not list(tmp_path.glob(".*.tmp"))


# ------------------------------------------------------------------ inputs are never outputs
def _own_copy(files, tmp_path, name):
    """A copy of a data file for this test alone (the code before overwrote it)."""
    copy = tmp_path / name
    copy.write_bytes((files / name).read_bytes())
    return copy


@pytest.mark.parametrize("option", ["-o", "--report-json", "--plot", "--state"])
def test_no_output_may_be_the_training_data_even_with_force(files, tmp_path, option):
    data = _own_copy(files, tmp_path, "data.safetensors")
    before = data.read_bytes()
    extra = [option, data] if option == "-o" else ["-o", tmp_path / "slim.safetensors", option, data]
    args = run_args(files, *extra, "--force")
    args[args.index("--data") + 1] = str(data)
    line = quick_error(invoke(args))  # before: the data was overwritten
    assert "is the --data file" in line and "even with --force" in line
    assert data.read_bytes() == before


def test_no_output_may_be_the_held_out_data_or_a_link_to_it(files, tmp_path):
    held = _own_copy(files, tmp_path, "held.safetensors")
    before = held.read_bytes()
    link = tmp_path / "link.json"
    link.symlink_to(held)
    for extra in (["-o", held], ["-o", tmp_path / "s.safetensors", "--report-json", link]):
        line = quick_error(invoke(run_args(files, "--eval-data", held, *extra, "--force")))
        assert "is the --eval-data file" in line
    assert held.read_bytes() == before


# ------------------------------------------------------------------ only regular files are read
def _fifo(tmp_path, name):
    path = tmp_path / name
    os.mkfifo(path)
    return path


def _subprocess(args, tmp_path):
    """The command in a child process: a read that blocks fails the test instead of hanging it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    try:
        return subprocess.run([sys.executable, "-m", "compressor", *map(str, args)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"compress {' '.join(map(str, args))} blocked on a FIFO")


@pytest.mark.parametrize("role", ["model", "data", "inspect", "eval-data", "state"])
def test_a_fifo_is_refused_not_read(files, tmp_path, role):
    fifo = _fifo(tmp_path, "input.safetensors")
    out = tmp_path / "slim.safetensors"
    weights = [files / "weights.safetensors", "--arch", "compressor.zoo:digits_net"]
    args = {
        "model": [fifo, "--arch", "compressor.zoo:digits_net", "--data", "digits", *QUICK, "-o", out],
        "data": [*weights, "--data", fifo, *QUICK, "-o", out],
        "inspect": ["inspect", fifo],
        "eval-data": run_args(files, "--eval-data", fifo, "-o", out),
        "state": run_args(files, "-o", out, "--state", fifo, "--resume"),
    }[role]
    r = _subprocess(args, tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and "not a regular file" in line and "Traceback" not in r.stderr, r.stderr


# ------------------------------------------------------------------ modes and names
def test_outputs_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "state.pt", lambda tmp: Path(tmp).write_bytes(b"s"))
        with staged_outputs([tmp_path / "slim.safetensors"]) as staged:  # safetensors makes its file anew, 0600
            save_file({"x": torch.zeros(2)}, str(staged[tmp_path / "slim.safetensors"]))
        assert (tmp_path / "state.pt").stat().st_mode & 0o777 == 0o644  # before: 0600 always
        assert (tmp_path / "slim.safetensors").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        atomic_write(tmp_path / "private.pt", lambda tmp: Path(tmp).write_bytes(b"s"))
        assert (tmp_path / "private.pt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_a_run_writes_files_the_umask_allows_and_a_trailing_slash_is_a_folder(files, tmp_path):
    old = os.umask(0o022)
    try:
        r = invoke(run_args(files, "-o", f"{tmp_path / 'newdir'}/", "--report-json", tmp_path / "r.json"))
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.stderr
    written = tmp_path / "newdir" / "weights.slim.safetensors"  # before: a file named newdir
    assert written.is_file()
    assert written.stat().st_mode & 0o777 == 0o644 and (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
    into = invoke(run_args(files, "-o", tmp_path / "newdir", "--force"))  # an existing folder: written into
    assert into.exit_code == 0, into.stderr
    assert sorted(p.name for p in (tmp_path / "newdir").iterdir()) == ["weights.slim.safetensors"]
