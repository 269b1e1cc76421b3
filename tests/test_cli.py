"""Real runs of the `compress` command on tiny models and small data."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from compressor import evaluate, load, read_metadata
from compressor.cli import main
from compressor.data import TensorLoader, resolve_data
from compressor.zoo import digits_net

QUICK = ["--epochs", "2", "--batch-size", "64"]
# DigitsNet by hand: conv 1*8*3*3 + 8, fc1 512*96 + 96, fc2 96*10 + 10.
DIGITS_NET_PARAMS = (8 * 9 + 8) + (512 * 96 + 96) + (96 * 10 + 10)


def file_numel(path):
    """Number of values a safetensors file stores, read from the file itself."""
    with safe_open(str(path), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def ring_params(modes, ranks):
    """Cores (r_{k-1}, n_k, r_k) of a tensor ring (a train's closing bond is 1)."""
    return sum(ranks[k - 1] * modes[k] * ranks[k] for k in range(len(modes)))


def flat(text):
    """Rich output on one line, runs of spaces collapsed (tables wrap at the console width)."""
    return " ".join(text.split())


def number_after(label, text, unit=""):
    """The number printed after ``label`` (a table cell or running text) in ``text``."""
    m = re.search(re.escape(label) + r"[\s│:]*([-+]?[\d,]+(?:\.\d+)?)" + re.escape(unit), flat(text))
    assert m, f"{label!r} not followed by a number in:\n{text}"
    return m.group(1)


def pct(x):
    return f"{100 * x:.2f}"


@pytest.fixture
def wide_output(monkeypatch):
    """Rich folds table cells at the console width (80 columns when not a terminal, or
    $COLUMNS): make it wide enough that every table row the tests read is one line."""
    from compressor import cli

    monkeypatch.setattr(cli.out_console, "_width", 200)


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


def test_pt2_named_pt_compress_inspect_eval(files, trained_digits_net, tmp_path, wide_output):
    out = tmp_path / "slim.safetensors"
    r = invoke([files / "model.pt", "--target", "4x", "--data", files / "data.safetensors", "-o", out,
                "--export-pt2", "--plot", tmp_path / "run.png", *QUICK])
    assert r.exit_code == 0, r.output + r.stderr
    assert "fc1" in r.stdout and "ratio" in r.stdout and "→" in r.stdout
    assert out.exists() and out.with_suffix(".pt2").exists() and (tmp_path / "run.png").stat().st_size > 1000
    ratio = float(r.stdout.split("ratio ")[-1].split("x")[0])
    assert ratio >= 4
    # the ratio printed is the one of the file written: dense params by hand / values stored
    stored = file_numel(out)
    meta = read_metadata(out)
    assert meta["dense_params"] == DIGITS_NET_PARAMS and meta["params"] == stored
    assert f"{ratio:.2f}" == f"{DIGITS_NET_PARAMS / stored:.2f}" and DIGITS_NET_PARAMS / stored >= 4

    r = invoke(["inspect", out])
    assert r.exit_code == 0 and "fc1" in r.stdout, r.stdout + r.stderr
    assert number_after("—", r.stdout, " parameters") == f"{stored:,}"
    assert number_after("dense", r.stdout) == f"{DIGITS_NET_PARAMS:,}"
    assert number_after("→", r.stdout, "x") == f"{DIGITS_NET_PARAMS / stored:.2f}"
    for name, entry in meta["layers"].items():  # one row per factorized layer: its ranks and size by hand
        spec = entry["spec"]
        modes = [m for m in spec["in_modes"] + spec["out_modes"] if m > 1]
        assert spec["kind"] == "linear"  # DigitsNet's conv is too small to factorize
        size = ring_params(modes, spec["ranks"]) + (spec["out_features"] if spec["bias"] else 0)
        row = f"{name} │ {spec['kind']} │ {spec['decomp']} │ ({','.join(map(str, modes))}) │ " \
              f"({','.join(map(str, spec['ranks']))}) │ {size:,} │"
        assert row in flat(r.stdout), (row, r.stdout)

    # eval prints what compressor.evaluate and a direct comparison give on the same held-out split
    r = invoke(["eval", out, "--data", files / "data.safetensors", "--base", files / "model.pt"])
    assert r.exit_code == 0, r.stderr
    assert "agreement" in r.stdout and "accuracy" in r.stdout
    x, y = resolve_data(str(files / "data.safetensors"))["test"]
    slim = load(out, base=files / "model.pt")
    acc_slim, acc_dense = evaluate(slim, TensorLoader(x, y, 64)), evaluate(trained_digits_net, TensorLoader(x, y, 64))
    with torch.no_grad():
        a, b = slim(x), trained_digits_net(x)
    agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    worst = float((a - b).abs().max())
    shown = {k: float(number_after(k, r.stdout)) for k in ("accuracy (compressed)", "accuracy (original)",
                                                           "top-1 agreement with original", "max |logit difference|")}
    assert number_after("accuracy (compressed)", r.stdout, "%") == pct(acc_slim)
    assert number_after("accuracy (original)", r.stdout, "%") == pct(acc_dense)
    assert number_after("top-1 agreement with original", r.stdout, "%") == pct(agree)
    assert shown["max |logit difference|"] == pytest.approx(worst, abs=2e-4) and worst > 0
    # consistent with each other: accuracies can differ only on samples where the models disagree
    assert abs(shown["accuracy (compressed)"] - shown["accuracy (original)"]) \
        <= 100 - shown["top-1 agreement with original"] + 0.01
    assert f"({x.shape[0]:,} samples" in flat(r.stdout)

    # the exported program is the slim model: same logits (any batch size), same stored values
    ep = torch.export.load(str(out.with_suffix(".pt2")))
    assert sum(t.numel() for t in ep.state_dict.values()) == stored
    prog = ep.module()
    with torch.no_grad():
        assert prog(torch.rand(3, 1, 8, 8)).shape == (3, 10)
        assert (prog(x) - a).abs().max() <= 1e-5
        assert (prog(x[:1]) - a[:1]).abs().max() <= 1e-5


@pytest.fixture(scope="module")
def state_dict_runs(files, tmp_path_factory):
    """The same weights as a safetensors file and as a torch.save state dict, each compressed
    with --arch: {name: (result, checkpoint)}."""
    from compressor import cli

    d = tmp_path_factory.mktemp("state_dict_runs")
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli.out_console, "_width", 200)  # as wide_output does
        for name in ("weights.pt", "state_dict.pt"):
            out = d / (name.split(".")[0] + ".safetensors")
            runs[name] = invoke([files / name, "--arch", "compressor.zoo:digits_net", "--target", "3", "--data",
                                 "digits", "-o", out, "--decomp", "tt", *QUICK]), out
    return runs


@pytest.mark.parametrize("name", ["weights.pt", "state_dict.pt"])
def test_state_dict_with_arch(state_dict_runs, trained_digits_net, digits, name, wide_output):
    r, out = state_dict_runs[name]
    assert r.exit_code == 0, r.stderr
    # the weights file was really loaded into the architecture: the dense accuracy printed is
    # the trained net's (a fresh digits_net() scores ~10 %)
    x, y = digits[2], digits[3]
    dense_acc = evaluate(trained_digits_net, TensorLoader(x, y, 64))
    assert number_after("test accuracy: dense", r.stdout, "%") == pct(dense_acc)
    # the checkpoint reached the target in stored values, and records the architecture
    meta = read_metadata(out)
    stored = file_numel(out)
    assert meta["extra"]["arch"] == "compressor.zoo:digits_net" and meta["dense_params"] == DIGITS_NET_PARAMS
    assert DIGITS_NET_PARAMS / stored >= 3
    assert number_after("ratio", r.stdout, "x") == f"{DIGITS_NET_PARAMS / stored:.2f}"
    assert {e["spec"]["decomp"] for e in meta["layers"].values()} == {"tt"} and "fc1" in meta["layers"]
    # it loads back to the very model that was reported: every tensor comes from the file
    slim = load(out, base=digits_net)
    with torch.no_grad():
        logits = slim(x)
        assert torch.equal(load(out, base=trained_digits_net)(x), logits)
    acc = evaluate(slim, TensorLoader(x, y, 64))
    assert number_after("compressed", r.stdout, "%") == pct(acc) and acc >= dense_acc - 0.05
    # both files hold the same weights, so the two runs give the same model
    other_r, other = state_dict_runs["state_dict.pt" if name == "weights.pt" else "weights.pt"]
    assert other_r.exit_code == 0, other_r.stderr
    with torch.no_grad():
        assert (load(other, base=digits_net)(x) - logits).abs().max() <= 1e-5
    # The checkpoint records its factory, but code named by a file is imported only when the
    # user names it: without --arch the error says which one to pass.
    r = invoke(["eval", out, "--data", "digits"])
    assert r.exit_code == 2 and "made with --arch compressor.zoo:digits_net" in r.stderr, r.stderr
    r = invoke(["eval", out, "--data", "digits", "--arch", "compressor.zoo:digits_net"])
    assert r.exit_code == 0, r.stderr
    assert number_after("accuracy (compressed)", r.stdout, "%") == pct(acc)


def test_rank_select_baseline_from_cli(files, tmp_path):
    out = tmp_path / "svd.safetensors"
    r = invoke([files / "model.pt", "--target", "4x", "--data", "digits", "-o", out, "--rank-select", "svd", *QUICK])
    assert r.exit_code == 0, r.stderr
    from compressor import read_metadata

    spec = read_metadata(out)["layers"]["fc1"]["spec"]
    assert (spec["in_modes"], spec["out_modes"], spec["decomp"]) == ([512], [96], "tt")  # a two-factor matrix
    assert_user_error(invoke([files / "model.pt", "--target", "4x", "--data", "digits", "-o", out, "--force",
                              "--rank-select", "magic"]), "unknown rank selector")


def test_skip_from_cli_keeps_the_layer_dense(files, tmp_path):
    out = tmp_path / "skip.safetensors"
    r = invoke([files / "model.pt", "--target", "2x", "--data", "digits", "-o", out, "--skip", "fc2", *QUICK])
    assert r.exit_code == 0, r.stderr
    from compressor import read_metadata

    assert set(read_metadata(out)["layers"]) == {"fc1"}
    assert_user_error(invoke([files / "model.pt", "--target", "2x", "--data", "digits", "-o", tmp_path / "x",
                              "--skip", "fc9"]), "skip 'fc9' matches no layer kind", tmp_path / "x")


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
    (["--gate-margin", "-1"], "gate margin"),
    (["--distill-hidden", "-0.1"], "distill-hidden weight"),
    (["--distill-hidden", "1"], "repeated blocks"),  # the digits MLP has no blocks to match
    (["--time-budget", "soon"], "time budget 'soon' is not a duration"),
    (["--early-stop-patience", "0"], "early-stop patience"),
    (["--penalty", "squared"], "unknown penalty 'squared'"),
    (["--rank-select", "mars", "--penalty", "params"], "penalty 'params' does not apply to it"),
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
                 "--seed", "--data", "--batch-size", "--report-json", "--gate-margin", "--distill-hidden",
                 "--time-budget", "--early-stop / --no-early-stop", "--penalty", "--early-stop-patience", "--early-stop-min-delta"):
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
    # half a torch.export zip has no central directory: not recognisable as any model format
    ("truncated.pt", "truncated.pt is not a model file compressor can read"), (".", "directory"),
    ("tiny.pt2", "no eligible layer"),
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


def test_summary_points_out_a_ratio_far_past_the_target(monkeypatch, tmp_path):
    import io

    from rich.console import Console

    from compressor import cli
    from compressor.api import Report

    shown = io.StringIO()
    monkeypatch.setattr(cli, "out_console", Console(file=shown, width=300))
    rep = Report(decomp="tr", target=2.0, source="module", dense_params=1000, params=400, ratio=2.5, param_ratio=2.5)
    cli._print_summary(rep, [])
    assert "more than 5 % past the target" in shown.getvalue()
    shown.truncate(0)
    cli._print_summary(Report(decomp="tr", target=2.0, source="module", dense_params=1000, params=490,
                              ratio=1000 / 490, param_ratio=2.0), [])
    assert "past the target" not in shown.getvalue() and "ratio 2.04x" in shown.getvalue()


def test_progress_goes_to_a_log_as_plain_lines(files, tmp_path):
    """Output that is not a terminal (a log file, CI) gets one plain line per progress event
    and per set-up stage, instead of a live bar that would print only at the end."""
    r = invoke([files / "model.pt", "--target", "4x", "--data", "digits", "-o", tmp_path / "s.safetensors",
                "--log-every", "3", *QUICK])
    assert r.exit_code == 0, r.stderr
    steps = re.findall(r"step (\d+)/(\d+) (gates\+weights|weights): loss [\d.]+ ratio [\d.]+x", r.stderr)
    assert len(steps) >= 2 and all(int(s) % 3 == 0 or s == total for s, total, _ in steps)
    assert "planning which layers to factorize" in r.stderr and "building the factorized model" in r.stderr
    assert "fine-tuning budget: 2 epochs of" in r.stderr and "s a step over the first 5 steps" in r.stderr
    assert "stopped at step" in r.stderr  # the last event says why
    phases = re.search(r"gate phase: ([\d,]+) steps.*\n.*weight phase: ([\d,]+) steps.*\n.*stopped at step ([\d,]+) "
                       r"of ([\d,]+): the epochs asked for were done", r.stdout)
    assert phases and int(phases[1]) + int(phases[2]) == int(phases[3]) == int(phases[4])
    assert "\x1b[" not in r.stderr  # no terminal control codes in a log
