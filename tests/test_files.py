"""Shared safe file handling: one-line errors, atomic writes, safetensors never unpickled."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

from compressor.errors import CheckpointError, DataError, ModelError, first_line
from compressor.files import atomic_write, read_safetensors, read_safetensors_header, require_file


def test_first_line():
    assert first_line(ValueError("  headline\nstack\ndump ")) == "headline"
    assert first_line(ValueError("x" * 500), limit=10) == "x" * 10
    assert first_line(KeyError()) == "KeyError"
    assert first_line(RuntimeError("bad\nmore"), with_type=True) == "RuntimeError: bad"
    assert first_line(OSError(), with_type=True) == "OSError"


def test_require_file(tmp_path):
    with pytest.raises(DataError, match="data file .* does not exist"):
        require_file(tmp_path / "nope", DataError, "data file")
    with pytest.raises(ModelError, match="is a directory"):
        require_file(tmp_path, ModelError, "model file")
    (tmp_path / "f").write_bytes(b"x")
    assert require_file(tmp_path / "f", ModelError, "model file") == tmp_path / "f"


def test_read_safetensors_round_trip(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.arange(3)}, str(path), metadata={"k": "v"})
    assert torch.equal(read_safetensors(path, DataError, "data file")["a"], torch.arange(3))
    assert read_safetensors_header(path, DataError, "data file") == ({"k": "v"}, {"a": (3,)})


@pytest.mark.parametrize("error_cls", [DataError, ModelError, CheckpointError])
def test_read_safetensors_bad_files_are_one_line(tmp_path, error_cls):
    pickled = tmp_path / "evil.pt"
    pickled.write_bytes(pickle.dumps({"inputs": [1, 2, 3]}))
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.randn(64, 64)}, str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    for bad, fragment in ((pickled, "not a readable safetensors file"), (truncated, "safetensors"),
                          (tmp_path / "missing.safetensors", "does not exist"), (tmp_path, "directory")):
        with pytest.raises(error_cls, match=fragment) as info:
            read_safetensors(bad, error_cls, "some file", hint=" (a hint)")
        message = str(info.value)
        assert "\n" not in message and message.startswith("some file ")
    with pytest.raises(error_cls, match=r"\(a hint\)$"):
        read_safetensors(pickled, error_cls, "some file", hint=" (a hint)")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    atomic_write(target, lambda tmp: open(tmp, "wb").write(b"ok"))
    assert target.read_bytes() == b"ok"

    def boom(tmp):
        open(tmp, "wb").write(b"half")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_bytes() == b"ok" and not list(target.parent.glob(".*.tmp"))
