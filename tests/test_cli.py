"""Real runs of the `compress` command on tiny models and small data."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

from compressor.cli import main

QUICK = ["--epochs", "2", "--batch-size", "64"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, trained_digits_net, digits):
    d = tmp_path_factory.mktemp("cli")
    xtr, ytr, xte, yte = digits
    model = trained_digits_net
    ep = torch.export.export(model, (xte[:4].clone(),), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(ep, str(d / "model.pt"))  # a .pt2 named .pt: detected by content
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "weights.pt"))
    torch.save(model.state_dict(), str(d / "state_dict.pt"))
    torch.save(model, str(d / "pickled.pt"))
    save_file({"inputs": xtr.contiguous(), "labels": ytr.contiguous()}, str(d / "data.safetensors"))
    save_file({"inputs": torch.randn(20, 3, 5, 5)}, str(d / "wrong_shape.safetensors"))
    tiny = torch.export.export(nn.Sequential(nn.Flatten(1), nn.Linear(64, 10)), (xte[:4].clone(),),
                               dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(tiny, str(d / "tiny.pt2"))
    (d / "empty.pt").write_bytes(b"")
    (d / "random.pt").write_bytes(os.urandom(4096))
    raw = (d / "model.pt").read_bytes()
    (d / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    return d


def invoke(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_user_error(result, fragment, not_written=None):
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output + result.stderr
    if not_written is not None:
        assert not Path(not_written).exists()
        assert not list(Path(not_written).parent.glob(".*.tmp"))


def test_pt2_named_pt_compress_inspect_eval(files, tmp_path):
    out = tmp_path / "slim.safetensors"
    r = invoke([files / "model.pt", "--target", "4x", "--data", files / "data.safetensors", "-o", out,
                "--export-pt2", "--plot", tmp_path / "run.png", *QUICK])
    assert r.exit_code == 0, r.output + r.stderr
    assert "fc1" in r.stdout and "ratio" in r.stdout and "→" in r.stdout
    assert out.exists() and out.with_suffix(".pt2").exists() and (tmp_path / "run.png").stat().st_size > 1000
    ratio = float(r.stdout.split("ratio ")[-1].split("x")[0])
    assert ratio >= 4
    r = invoke(["inspect", out])
    assert r.exit_code == 0 and "fc1" in r.stdout and "x" in r.stdout
    r = invoke(["eval", out, "--data", files / "data.safetensors", "--base", files / "model.pt"])
    assert r.exit_code == 0, r.stderr
    assert "agreement" in r.stdout and "accuracy" in r.stdout
    prog = torch.export.load(str(out.with_suffix(".pt2"))).module()
    assert prog(torch.rand(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize("name", ["weights.pt", "state_dict.pt"])
def test_state_dict_with_arch(files, tmp_path, name):
    out = tmp_path / "s.safetensors"
    r = invoke([files / name, "--arch", "compressor.zoo:digits_net", "--target", "3", "--data", "digits",
                "-o", out, "--decomp", "tt", *QUICK])
    assert r.exit_code == 0, r.stderr
    r = invoke(["eval", out, "--data", "digits"])  # architecture recorded in the checkpoint
    assert r.exit_code == 0, r.stderr


def test_rank_select_baseline_from_cli(files, tmp_path):
    out = tmp_path / "svd.safetensors"
    r = invoke([files / "model.pt", "--target", "4x", "--data", "digits", "-o", out, "--rank-select", "svd", *QUICK])
    assert r.exit_code == 0, r.stderr
    from compressor import read_metadata

    spec = read_metadata(out)["layers"]["fc1"]["spec"]
    assert (spec["in_modes"], spec["out_modes"], spec["decomp"]) == ([512], [96], "tt")  # a two-factor matrix
    assert_user_error(invoke([files / "model.pt", "--target", "4x", "--data", "digits", "-o", out, "--force",
                              "--rank-select", "magic"]), "unknown rank selector")


def test_state_dict_without_arch(files, tmp_path):
    assert_user_error(invoke([files / "weights.pt", "--target", "3", "--data", "digits", "-o", tmp_path / "o"]),
                      "--arch", tmp_path / "o")


def test_pickle_needs_trust_flag(files, tmp_path):
    out = tmp_path / "p.safetensors"
    assert_user_error(invoke([files / "pickled.pt", "--target", "3", "--data", "digits", "-o", out]),
                      "--trust-pickle", out)
    r = invoke([files / "pickled.pt", "--trust-pickle", "--target", "3", "--data", "digits", "-o", out, *QUICK])
    assert r.exit_code == 0, r.stderr
    assert out.exists()


BAD = [
    (["--target", "abc"], "not a number"),
    (["--target", "1x"], "greater than 1"),
    (["--target", "100000x"], "more than this model can give"),
    (["--decomp", "cp"], "unknown decomposition"),
    (["--epochs", "-1"], "epochs"),
    (["--lambda", "-0.5"], "lambda"),
    (["--sigma", "0"], "sigma"),
    (["--epochs", "many"], "many"),
]


@pytest.mark.parametrize("extra,fragment", BAD)
def test_bad_options(files, tmp_path, extra, fragment):
    out = tmp_path / "o.safetensors"
    args = [files / "model.pt", "--target", "4x", "--data", "digits", "-o", out] + extra
    assert_user_error(invoke(args), fragment, out)


def test_config_options_are_generated_with_help():
    from compressor.selectors import selector_names

    r = invoke(["run", "--help"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    for flag in ("--target", "--decomp", "--epochs", "--lambda", "--sigma", "--rank", "--rank-select", "--lr",
                 "--seed", "--data", "--batch-size", "--report-json"):
        assert flag in text
    assert "[" + "|".join(selector_names()) + "]" in text  # the choices come from the registry
    assert "initial l0 penalty weight" in text and "gate noise std" in text and "[default: 0.5]" in text


@pytest.mark.parametrize("extra,fragment", [
    (["--sigma", "-1"], "sigma must be a number > 0"),
    (["--rank-select", "nope"], "unknown rank selector 'nope'"),
    (["--rank", "0"], "rank must be a positive integer"),
    (["--lr", "0"], "lr must be a number > 0"),
])
def test_bad_config_values_are_one_error_line(tmp_path, extra, fragment):
    out = tmp_path / "o.safetensors"
    # The config is validated before the model is even looked for.
    args = [tmp_path / "model.pt", "--target", "4x", "--data", "digits", "-o", out] + extra
    assert_user_error(invoke(args), fragment, out)


@pytest.mark.parametrize("model,fragment", [
    ("missing.pt", "does not exist"), ("empty.pt", "empty"), ("random.pt", "not a model file"),
    ("truncated.pt", ""), (".", "directory"), ("tiny.pt2", "no eligible layer"),
])
def test_bad_model_files(files, tmp_path, model, fragment):
    out = tmp_path / "o.safetensors"
    before = {p.name: p.stat().st_mtime for p in files.iterdir()}
    assert_user_error(invoke([files / model, "--target", "4x", "--data", "digits", "-o", out]), fragment, out)
    assert before == {p.name: p.stat().st_mtime for p in files.iterdir()}


@pytest.mark.parametrize("data,fragment", [
    ("missing.safetensors", "does not exist"), ("wrong_shape.safetensors", "does not fit the model"),
    ("nonsense", "unknown data"),
])
def test_bad_data(files, tmp_path, data, fragment):
    out = tmp_path / "o.safetensors"
    spec = files / data if data.endswith(".safetensors") else data
    assert_user_error(invoke([files / "model.pt", "--target", "4x", "--data", spec, "-o", out]), fragment, out)


def test_fashion_mnist_missing_says_how_to_install(files, tmp_path):
    r = invoke([files / "model.pt", "--target", "4x", "--data", f"fashion-mnist:{tmp_path / 'nowhere'}",
                "-o", tmp_path / "o"])
    assert_user_error(r, "apt-get install dataset-fashion-mnist")


def test_output_is_input_and_existing_output(files, tmp_path):
    model = files / "model.pt"
    before = model.read_bytes()
    assert_user_error(invoke([model, "--target", "4x", "--data", "digits", "-o", model]), "is the input model")
    assert model.read_bytes() == before
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"keep me")
    assert_user_error(invoke([model, "--target", "4x", "--data", "digits", "-o", existing]), "--force")
    assert existing.read_bytes() == b"keep me"


def test_inspect_corrupted_checkpoint(files, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(os.urandom(100))
    assert_user_error(invoke(["inspect", bad]), "not a readable safetensors")
    assert_user_error(invoke(["inspect", tmp_path / "nope.safetensors"]), "does not exist")


def test_console_script_runs_as_subprocess(files):
    r = subprocess.run([sys.executable, "-m", "compressor.cli", "inspect", str(files / "random.pt")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
