"""Data loaders and the reference LeNet-5: real files, real parsing, real errors."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from compressor.data import (
    TensorLoader,
    fashion_mnist_dir,
    load_digits_data,
    load_fashion_mnist,
    load_tensor_file,
    resolve_data,
    split_holdout,
)
from compressor.errors import CompressorError, DataError
from compressor.zoo import LeNet5, lenet5

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# --------------------------------------------------------------------------- helpers


def idx_images(images: np.ndarray) -> bytes:
    n, h, w = images.shape
    return struct.pack(">IIII", 0x00000803, n, h, w) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 0x00000801, len(labels)) + labels.astype(np.uint8).tobytes()


def write_fake_fmnist(root: Path, gz: bool, n_train: int = 12, n_test: int = 5) -> dict:
    """A tiny but valid Fashion-MNIST folder; returns the arrays written."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[0, 0, 0], images[0, 0, 1] = 0, 255
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        arrays[split] = (images, labels)
        for stem, blob in zip(FILES[split], (idx_images(images), idx_labels(labels))):
            if gz:
                (root / (stem + ".gz")).write_bytes(gzip.compress(blob))
            else:
                (root / stem).write_bytes(blob)
    return arrays


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("COMPRESSOR_FASHION_MNIST", raising=False)


# --------------------------------------------------------------------------- IDX / Fashion-MNIST


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_idx_parsing_roundtrip(tmp_path, gz, no_env):
    arrays = write_fake_fmnist(tmp_path, gz=gz)
    assert fashion_mnist_dir(tmp_path) == tmp_path
    for split in ("train", "test"):
        x, y = load_fashion_mnist(split, root=tmp_path)
        images, labels = arrays[split]
        assert x.dtype == torch.float32 and x.shape == (len(labels), 1, 28, 28)
        assert y.dtype == torch.int64 and y.shape == (len(labels),)
        assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))
        assert torch.allclose(x[:, 0] * 255, torch.from_numpy(images).float(), atol=1e-4)
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0


def test_env_var_selects_folder(tmp_path, monkeypatch):
    write_fake_fmnist(tmp_path, gz=True)
    monkeypatch.setenv("COMPRESSOR_FASHION_MNIST", str(tmp_path))
    assert fashion_mnist_dir() == tmp_path
    data = resolve_data(f"fashion-mnist:{tmp_path}")
    assert data["train"][0].shape[0] == 12 and data["test"][0].shape[0] == 5


def test_missing_fashion_mnist_says_how_to_fix(tmp_path, monkeypatch):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    with pytest.raises(DataError) as err:
        fashion_mnist_dir(empty)
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert str(empty) in msg and "COMPRESSOR_FASHION_MNIST" in msg and "\n" not in msg
    monkeypatch.setenv("COMPRESSOR_FASHION_MNIST", str(empty))
    with pytest.raises(DataError, match="apt-get"):
        load_fashion_mnist("train")
    with pytest.raises(DataError, match="apt-get"):
        resolve_data(f"fashion-mnist:{tmp_path / 'missing'}")


def test_truncated_idx_names_the_file(tmp_path, no_env):
    write_fake_fmnist(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated") as err:
        load_fashion_mnist("train", root=tmp_path)
    assert str(path) in str(err.value)
    path.write_bytes(path.read_bytes()[:10])  # cut inside the header
    with pytest.raises(DataError, match="truncated"):
        load_fashion_mnist("train", root=tmp_path)


def test_corrupt_idx_magic_and_gzip(tmp_path, no_env):
    write_fake_fmnist(tmp_path, gz=True)
    # labels file where the images file should be: wrong magic number
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    images.write_bytes((tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes())
    with pytest.raises(DataError, match="magic number") as err:
        load_fashion_mnist("test", root=tmp_path)
    assert str(images) in str(err.value)
    # not gzip at all
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(b"this is not gzip data")
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        load_fashion_mnist("train", root=tmp_path)
    # truncated gzip stream
    labels.write_bytes(gzip.compress(idx_labels(np.zeros(12, np.uint8)))[:-12])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        load_fashion_mnist("train", root=tmp_path)


def test_bad_split_name(tmp_path, no_env):
    write_fake_fmnist(tmp_path, gz=False)
    with pytest.raises(DataError, match="split"):
        load_fashion_mnist("validation", root=tmp_path)


# Needs Debian's dataset-fashion-mnist (installed by .ci/run). Without it this test FAILS
# with an install hint rather than skipping silently; COMPRESSOR_SKIP_FASHION_MNIST=1 opts
# out explicitly (see the real_fashion_mnist fixture in conftest.py).
def test_real_fashion_mnist(real_fashion_mnist, no_env):
    assert real_fashion_mnist == DEBIAN_FMNIST and fashion_mnist_dir() == DEBIAN_FMNIST
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.equal(torch.bincount(y), torch.full((10,), 1000))
    # The published file's first labels and pixel statistics (not just any 10k images).
    assert y[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert float(x.mean()) == pytest.approx(0.2868, abs=1e-3)
    x, y = load_fashion_mnist("train")
    assert x.shape == (60000, 1, 28, 28) and y.shape == (60000,)
    assert torch.equal(torch.bincount(y), torch.full((10,), 6000))
    assert y[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    # mean/std of the training pixels: the normalisation constants everyone quotes
    assert float(x.mean()) == pytest.approx(0.2860, abs=1e-3) and float(x.std()) == pytest.approx(0.3530, abs=1e-3)


# --------------------------------------------------------------------------- digits


def test_digits_shapes_and_split():
    x, y = load_digits_data()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    data = resolve_data("digits")
    (tx, ty), (vx, vy) = data["train"], data["test"]
    assert tx.shape[0] + vx.shape[0] == 1797 and vx.shape[0] == round(1797 * 0.2)
    assert ty.shape[0] == tx.shape[0] and vy.shape[0] == vx.shape[0]
    again = resolve_data("digits")
    assert torch.equal(again["test"][0], vx) and torch.equal(again["test"][1], vy)


# --------------------------------------------------------------------------- safetensors files


def test_tensor_file_roundtrip(tmp_path):
    x = torch.randn(50, 3, 4)
    y = torch.arange(50, dtype=torch.int32) % 7
    path = tmp_path / "data.safetensors"
    save_file({"inputs": x, "labels": y}, str(path))
    gx, gy = load_tensor_file(path)
    assert torch.equal(gx, x) and gy.dtype == torch.int64 and torch.equal(gy, y.long())

    data = resolve_data(str(path))
    (tx, ty), (vx, vy) = data["train"], data["test"]
    assert tx.shape[0] == 45 and vx.shape[0] == 5 and ty.shape == (45,) and vy.shape == (5,)
    # together the parts are exactly the file, each sample once
    got = torch.cat([ty, vy]).sort().values
    assert torch.equal(got, y.long().sort().values)

    # inputs only: labels None on both sides; float64 becomes float32
    path2 = tmp_path / "unlabeled.safetensors"
    save_file({"inputs": torch.randn(20, 5, dtype=torch.float64)}, str(path2))
    gx, gy = load_tensor_file(path2)
    assert gy is None and gx.dtype == torch.float32
    data = resolve_data(str(path2))
    assert data["train"][1] is None and data["test"][1] is None
    assert data["train"][0].shape[0] + data["test"][0].shape[0] == 20


def test_tensor_file_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tensor_file(tmp_path / "nope.safetensors")
    with pytest.raises(DataError, match="directory"):
        load_tensor_file(tmp_path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01 definitely not safetensors \xff" * 4)
    with pytest.raises(DataError, match="not a readable safetensors"):
        load_tensor_file(junk)
    empty_file = tmp_path / "empty.safetensors"
    empty_file.write_bytes(b"")
    with pytest.raises(DataError, match="not a readable safetensors"):
        load_tensor_file(empty_file)

    cases = {
        "noinputs": ({"x": torch.ones(3, 2)}, "no tensor named 'inputs'"),
        "emptyinputs": ({"inputs": torch.zeros(0, 4)}, "empty"),
        "mismatch": ({"inputs": torch.ones(5, 2), "labels": torch.zeros(4, dtype=torch.int64)},
                     "5 inputs but 4 labels"),
        "floatlabels": ({"inputs": torch.ones(5, 2), "labels": torch.zeros(5)}, "integer"),
        "negative": ({"inputs": torch.ones(3, 2), "labels": torch.tensor([0, -1, 2])}, "negative"),
    }
    for name, (tensors, message) in cases.items():
        p = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(p))
        with pytest.raises(DataError, match=message) as err:
            load_tensor_file(p)
        assert str(p) in str(err.value) and "\n" not in str(err.value)
        assert isinstance(err.value, CompressorError)


def test_resolve_data_unknown_spec(tmp_path):
    with pytest.raises(DataError) as err:
        resolve_data("imagenet")
    msg = str(err.value)
    assert "fashion-mnist" in msg and "digits" in msg and ".safetensors" in msg
    with pytest.raises(DataError, match="does not exist"):
        resolve_data(str(tmp_path / "missing.safetensors"))
    with pytest.raises(DataError):
        resolve_data("")


# --------------------------------------------------------------------------- TensorLoader


def test_loader_batches_and_coverage():
    x = torch.arange(10, dtype=torch.float32).unsqueeze(1)
    y = torch.arange(10)
    loader = TensorLoader(x, y, batch_size=3)
    batches = list(loader)
    assert len(loader) == 4 and len(batches) == 4
    assert [b[0].shape[0] for b in batches] == [3, 3, 3, 1]
    assert torch.equal(torch.cat([b[1] for b in batches]), y)  # in order, no shuffle
    assert all(torch.equal(bx[:, 0].long(), by) for bx, by in batches)  # pairs stay paired

    dropped = TensorLoader(x, y, batch_size=3, drop_last=True)
    assert len(dropped) == 3 and [b[1].shape[0] for b in dropped] == [3, 3, 3]

    shuffled = TensorLoader(x, y, batch_size=4, shuffle=True, seed=1)
    for _ in range(3):
        epoch = list(shuffled)
        assert len(epoch) == len(shuffled) == 3
        seen = torch.cat([b[1] for b in epoch])
        assert torch.equal(seen.sort().values, y)  # every sample exactly once
        assert all(torch.equal(bx[:, 0].long(), by) for bx, by in epoch)


def test_loader_shuffle_is_deterministic_per_epoch():
    x = torch.randn(100, 2)
    y = torch.arange(100)
    order = lambda loader: torch.cat([b[1] for b in loader])  # noqa: E731
    a = TensorLoader(x, y, batch_size=16, shuffle=True, seed=7)
    b = TensorLoader(x, y, batch_size=16, shuffle=True, seed=7)
    a0, a1 = order(a), order(a)
    assert torch.equal(a0, order(b)) and torch.equal(a1, order(b))  # same seed, same epochs
    assert not torch.equal(a0, a1)  # a new order every epoch
    assert not torch.equal(a0, y)
    a.set_epoch(0)
    assert torch.equal(order(a), a0)  # replayable
    c = TensorLoader(x, y, batch_size=16, shuffle=True, seed=8)
    assert not torch.equal(order(c), a0)


def test_loader_inputs_only_and_validation():
    x = torch.randn(7, 3)
    batches = list(TensorLoader(x, batch_size=2, shuffle=True))
    assert all(isinstance(b, torch.Tensor) for b in batches)
    assert sum(b.shape[0] for b in batches) == 7
    with pytest.raises(DataError, match="batch size"):
        TensorLoader(x, batch_size=0)
    with pytest.raises(DataError, match="batch size"):
        TensorLoader(x, batch_size=-3)
    with pytest.raises(DataError, match="no data"):
        TensorLoader(torch.zeros(0, 3))
    with pytest.raises(DataError, match="labels"):
        TensorLoader(x, torch.zeros(6, dtype=torch.int64))


def test_split_holdout_deterministic():
    x = torch.arange(40, dtype=torch.float32).unsqueeze(1)
    y = torch.arange(40)
    tx, ty, vx, vy = split_holdout(x, y, fraction=0.25, seed=3)
    assert tx.shape[0] == 30 and vx.shape[0] == 10
    assert torch.equal(torch.cat([ty, vy]).sort().values, y)
    assert torch.equal(tx[:, 0].long(), ty) and torch.equal(vx[:, 0].long(), vy)
    assert torch.equal(split_holdout(x, y, 0.25, 3)[3], vy)
    assert not torch.equal(split_holdout(x, y, 0.25, 4)[3], vy)
    _, none_train, _, none_test = split_holdout(x, None, 0.1)
    assert none_train is None and none_test is None
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(DataError, match="fraction"):
            split_holdout(x, y, bad)


# --------------------------------------------------------------------------- zoo


def test_lenet5_layout():
    model = lenet5()
    assert isinstance(model, LeNet5)
    assert sum(p.numel() for p in model.parameters()) == 429_100
    keys = set(model.state_dict())
    assert {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
            "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"} == keys
    assert model.fc1.in_features == 1250 and model.conv1.padding == (2, 2)
    with torch.no_grad():
        out = model.eval()(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 10)
