import os
from pathlib import Path

import pytest
import torch
from torch import nn

from compressor.data import TensorLoader, load_digits_data, split_holdout
from compressor.zoo import DigitsNet

pytest_plugins = ["pytester"]  # tests/test_dependencies.py runs pytest on a copy of this file


@pytest.fixture(scope="session")
def digits():
    x, y = load_digits_data()
    return split_holdout(x, y, fraction=0.2, seed=0)


@pytest.fixture(scope="session")
def trained_digits_net(digits):
    """DigitsNet trained to ~95 % on sklearn's digits (a few seconds)."""
    xtr, ytr, xte, yte = digits
    torch.manual_seed(0)
    model = DigitsNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = TensorLoader(xtr, ytr, 64, shuffle=True, seed=0)
    for _ in range(15):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


@pytest.fixture
def digits_loaders(digits):
    xtr, ytr, xte, yte = digits
    return TensorLoader(xtr, ytr, 64, shuffle=True, seed=0), TensorLoader(xte, yte, 256)


# Real Fashion-MNIST (Debian's dataset-fashion-mnist, which .ci/run installs). Tests that
# need it must not skip silently: a CI machine without the package would then pass without
# ever reading the real files. So a missing dataset FAILS those tests with a message saying
# how to install it; set COMPRESSOR_SKIP_FASHION_MNIST=1 to skip them on purpose instead
# (e.g. on a laptop without the package). The skip reason names the variable, so the
# summary (`pytest -rs`) shows the skip was asked for.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
SKIP_FASHION_MNIST_ENV = "COMPRESSOR_SKIP_FASHION_MNIST"
_FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def missing_fashion_mnist_files(root: Path = DEBIAN_FASHION_MNIST) -> list[str]:
    """The IDX files (raw or .gz) that ``root`` lacks; all four when it is no folder."""
    return [stem for stem in _FASHION_MNIST_FILES
            if not ((root / stem).is_file() or (root / (stem + ".gz")).is_file())]


@pytest.fixture
def real_fashion_mnist() -> Path:
    """Debian's Fashion-MNIST folder; fails (never skips silently) when it is absent."""
    missing = missing_fashion_mnist_files(DEBIAN_FASHION_MNIST)
    if not missing:
        return DEBIAN_FASHION_MNIST
    if os.environ.get(SKIP_FASHION_MNIST_ENV) == "1":
        pytest.skip(f"Fashion-MNIST not installed and {SKIP_FASHION_MNIST_ENV}=1 asked to skip tests that need it")
    pytest.fail(f"real Fashion-MNIST is missing from {DEBIAN_FASHION_MNIST} ({', '.join(missing)}): install it with "
                f"`apt-get install dataset-fashion-mnist` (.ci/run does), or set {SKIP_FASHION_MNIST_ENV}=1 "
                "to skip the tests that need it on purpose", pytrace=False)


# Skips in CI. pytest prints every skip's reason (`-rs` in pyproject's addopts). A skip hides a
# feature that no longer runs, so in CI (.ci/run sets COMPRESSOR_CI_NO_SKIPS=1) the run fails
# when any test skips for a reason other than the GPU ones below: CI has no GPU, so the GPU
# test skips there and nothing else may. Locally (the variable unset) skips only show in the
# summary, so a developer without the Fashion-MNIST package can still run the rest.
CI_NO_SKIPS_ENV = "COMPRESSOR_CI_NO_SKIPS"
#: Skip reasons allowed in CI: the GPU test on a machine without CUDA, and the one check that
#: needs a machine without CUDA (tests/test_distributed.py).
GPU_SKIP_REASONS = frozenset({"no GPU on this machine", "this machine has a GPU"})
_unexpected_skips: list[tuple[str, str]] = []


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason


def _note_skip(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        if reason not in GPU_SKIP_REASONS:
            _unexpected_skips.append((report.nodeid, reason))


def pytest_runtest_logreport(report):
    _note_skip(report)


def pytest_collectreport(report):  # a module-level importorskip skips at collection
    _note_skip(report)


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get(CI_NO_SKIPS_ENV) == "1" and _unexpected_skips and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if os.environ.get(CI_NO_SKIPS_ENV) == "1" and _unexpected_skips:
        terminalreporter.section("skips that fail CI", sep="=", red=True, bold=True)
        for nodeid, reason in _unexpected_skips:
            terminalreporter.line(f"{nodeid}: {reason}")
        terminalreporter.line(f"{len(_unexpected_skips)} skipped for a reason other than the GPU's; "
                              f"{CI_NO_SKIPS_ENV}=1 makes that a failure (only the GPU test may skip)")
