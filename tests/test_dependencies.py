"""What the package says it needs is what it needs: optional packages fail with one line
naming the extra, the `bench` extra covers what benchmarks/ imports, and CI fails on a skip."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from compressor.cli import main
from compressor.data import DataError, resolve_data

ROOT = Path(__file__).resolve().parent.parent
LENET5 = ROOT / "examples" / "lenet5.pt2"


@pytest.fixture
def no_sklearn(monkeypatch):
    """scikit-learn as if it were not installed: a None entry makes `import` raise ImportError."""
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")] + ["sklearn", "sklearn.datasets"]:
        monkeypatch.setitem(sys.modules, name, None)


def test_digits_without_scikit_learn_says_which_extra_to_install(no_sklearn, tmp_path):
    out = tmp_path / "x.safetensors"
    result = CliRunner().invoke(main, [str(LENET5), "--decomp", "tr", "--target", "5x", "--data", "digits",
                                       "-o", str(out), "--epochs", "1"])
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: the 'digits' data set needs scikit-learn"), lines[0]
    assert "pip install 'compressor[digits]'" in lines[0]
    assert "Traceback" not in result.output + result.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_digits_without_scikit_learn_from_python_is_one_data_error(no_sklearn):
    with pytest.raises(DataError, match=re.escape("pip install 'compressor[digits]'")):
        resolve_data("digits")


def test_plot_without_matplotlib_says_which_extra_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "x.safetensors"
    result = CliRunner().invoke(main, [str(LENET5), "--target", "5x", "--data", "digits", "-o", str(out),
                                       "--plot", str(tmp_path / "run.png")])
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --plot needs matplotlib"), result.stderr
    assert "pip install 'compressor[plot]'" in lines[0]
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ extras in the package's metadata

def _extra(name: str) -> set[str]:
    """Distribution names (lower case) the installed package's extra ``name`` requires."""
    wanted = set()
    for req in importlib.metadata.requires("compressor") or []:
        spec, _, marker = req.partition(";")
        if re.search(r"extra\s*==\s*['\"]" + re.escape(name) + r"['\"]", marker):
            wanted.add(re.split(r"[\s<>=!~\[;(]", spec.strip(), maxsplit=1)[0].lower().replace("_", "-"))
    return wanted


def _core() -> set[str]:
    return {re.split(r"[\s<>=!~\[;(]", r.strip(), maxsplit=1)[0].lower().replace("_", "-")
            for r in importlib.metadata.requires("compressor") or [] if "extra ==" not in r}


# import name -> distribution name where they differ
_DISTRIBUTION = {"sklearn": "scikit-learn", "opt_einsum": "opt-einsum", "yaml": "pyyaml"}


def _third_party_imports(path: Path) -> set[str]:
    local = {p.stem for p in path.parent.glob("*.py")}
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in local and n != "compressor"}


def test_digits_extra_is_scikit_learn_and_not_a_core_dependency():
    assert _extra("digits") == {"scikit-learn"}
    assert "scikit-learn" not in _core()
    assert "scikit-learn" in _extra("test")  # the tests read digits


def test_bench_extra_pulls_what_every_benchmark_imports():
    available = _core() | _extra("bench")
    # compressor.hf_folders, which llm.py and others import, needs the hf extra
    assert _extra("hf") <= _extra("bench")
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        for module in _third_party_imports(script):
            assert _DISTRIBUTION.get(module, module).lower() in available, (script.name, module)
    # prepare_smollm2.py reads a GGUF file through transformers, which then needs these two
    assert {"gguf", "accelerate"} <= _extra("bench")


# ------------------------------------------------------------------ CI fails on a skip that is not the GPU's

_TESTS = '''
import pytest

def test_runs():
    pass

@pytest.mark.skipif(True, reason="no GPU on this machine")
def test_gpu():
    pass

def test_other():
    pytest.skip("some package is missing")
'''


@pytest.fixture
def with_our_conftest(pytester):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    return pytester


@pytest.mark.parametrize("ci", [False, True])
def test_a_skip_other_than_the_gpu_test_fails_only_in_ci(with_our_conftest, monkeypatch, ci):
    if ci:
        monkeypatch.setenv("COMPRESSOR_CI_NO_SKIPS", "1")
    else:
        monkeypatch.delenv("COMPRESSOR_CI_NO_SKIPS", raising=False)
    with_our_conftest.makepyfile(_TESTS)
    result = with_our_conftest.runpytest("-rs")
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(["*SKIPPED*some package is missing*"])  # -rs names the reason
    if ci:
        assert result.ret == pytest.ExitCode.TESTS_FAILED
        result.stdout.fnmatch_lines(["*skips that fail CI*", "*test_other: some package is missing"])
        assert "test_gpu:" not in result.stdout.str()
    else:
        assert result.ret == pytest.ExitCode.OK


def test_the_gpu_skip_alone_passes_in_ci(with_our_conftest, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CI_NO_SKIPS", "1")
    with_our_conftest.makepyfile(_TESTS.split("def test_other")[0])
    result = with_our_conftest.runpytest("-rs")
    result.assert_outcomes(passed=1, skipped=1)
    assert result.ret == pytest.ExitCode.OK


def test_a_module_skipped_at_collection_fails_in_ci(with_our_conftest, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CI_NO_SKIPS", "1")
    with_our_conftest.makepyfile(test_skipped='import pytest\npytest.importorskip("no_such_module_xyz")\n',
                                 test_runs="def test_runs():\n    pass\n")
    result = with_our_conftest.runpytest("-rs")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*skips that fail CI*", "*no_such_module_xyz*"])
