"""Int8 slim checkpoints (``quantize="int8"``, ``--quantize int8``): the quantizer's error bound, a
reload that gives back exactly the weights and outputs the run measured, a target counted in the
file's bytes, and files whose int8 claims do not hold, each refused in one line."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from compressor import compress, load, read_metadata, save
from compressor.checkpoint import read_blueprint, served_budget
from compressor.cli import main
from compressor.config import CompressConfig
from compressor.data import TensorLoader
from compressor.errors import CheckpointError, ConfigError, TargetError
from compressor.quantize import QMAX, ByteBudget, dequantize, quantize_core, quantize_tensor, scale_name
from compressor.zoo import DigitsNet

# DigitsNet by hand: conv 1*8*3*3 + 8 (too small to factorize: stays dense), fc1 512*96 + 96 (factorized),
# fc2 96*10 + 10 (960 < min_params: dense).
DENSE = (8 * 9 + 8) + (512 * 96 + 96) + (96 * 10 + 10)
BIASES = 8 + 96 + 10
#: int8 alone, nothing factorized: every weight a byte, a float32 scale per output channel, biases float32.
INT8_ALONE = 4 * DENSE / (4 * BIASES + (DENSE - BIASES) + 4 * (8 + 96 + 10))


def invoke(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_error_line(result, fragment):
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]


def data_bytes(path: Path) -> int:
    """Bytes of a safetensors file's tensors as stored on disk: the file less its 8-byte length and header."""
    raw = path.read_bytes()
    return len(raw) - 8 - int.from_bytes(raw[:8], "little")


# ------------------------------------------------------------------ the quantizer
@pytest.mark.parametrize("shape,axis", [((96, 512), 0), ((8, 1, 3, 3), 0), ((5, 7, 11), 0), ((5, 7, 11), 2),
                                        ((64, 30), 1)])
def test_error_is_at_most_half_a_scale_per_channel(shape, axis):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[axis]).reshape([-1 if d == axis else 1
                                                                         for d in range(len(shape))])
    q = quantize_tensor(w, axis)
    assert q.values.dtype == torch.int8 and q.values.shape == w.shape and int(q.values.abs().max()) <= QMAX
    assert q.scale.dtype == torch.float32 and q.scale.shape == (shape[axis],)
    others = [d for d in range(len(shape)) if d != axis]
    assert torch.equal(q.scale, w.abs().amax(dim=others) / QMAX)  # max|w| / 127 per channel
    assert bool((q.values.abs().amax(dim=others) == QMAX).all())  # every channel's largest weight is +-127
    error = (w - q.dequantize()).abs().amax(dim=others)
    assert bool((error <= q.scale / 2 * (1 + 1e-5)).all()), (error / q.scale).max()


def test_a_channel_of_zeros_gets_a_positive_scale_and_stays_zero():
    w = torch.randn(4, 6)
    w[2] = 0
    q = quantize_tensor(w, 0)
    assert float(q.scale[2]) > 0 and bool((q.dequantize()[2] == 0).all())


def test_dequantize_gives_the_weight_dtype_back():
    w = torch.randn(6, 5, dtype=torch.bfloat16)
    q = quantize_tensor(w, 0)
    assert q.dequantize().dtype == torch.bfloat16
    assert torch.equal(q.dequantize(), dequantize(q.values, q.scale, 0, torch.bfloat16))


def test_quantize_is_checked_with_the_other_options():
    assert CompressConfig(quantize="int8").quantize == "int8"
    with pytest.raises(ConfigError, match="unknown quantization 'int4'; choose one of none, int8"):
        CompressConfig(quantize="int4")


# ------------------------------------------------------------------ the byte arithmetic
def test_the_element_target_meets_the_byte_target():
    budget = ByteBudget(target=6.0, dense=10_000, kept=100, dense_scales=0)
    aimed = budget.element_target(scales=50)
    elements = math.floor(10_000 / aimed)  # the largest model the run may keep
    assert budget.ratio(elements, 50) == pytest.approx(6.0, rel=1e-3) and budget.ratio(elements, 50) >= 6.0
    # int8 is 4x: a 6x file needs about 1.5x fewer elements, a little more for the float32 rest and the scales
    assert aimed == pytest.approx(10_000 / (4 * 10_000 / 6 - 3 * 100 - 4 * 50)) and 1.5 < aimed < 1.7


def test_a_byte_target_that_int8_alone_meets_is_one_error(trained_digits_net, digits_loaders):
    train, _ = digits_loaders
    with pytest.raises(TargetError, match=f"met by int8 quantization alone.*{INT8_ALONE:.2f}x smaller"):
        compress(trained_digits_net, train, target=INT8_ALONE - 0.5, quantize="int8", max_steps=2)


# ------------------------------------------------------------------ a run and its file
@pytest.fixture(scope="module")
def int8_run(trained_digits_net, digits, tmp_path_factory):
    xtr, ytr, xte, yte = digits
    train, test = TensorLoader(xtr, ytr, 64, shuffle=True, seed=0), TensorLoader(xte, yte, 256)
    result = compress(trained_digits_net, train, target="8x", quantize="int8", eval_loader=test, max_steps=40)
    path = save(result, tmp_path_factory.mktemp("int8") / "slim.safetensors")
    return result, path, xte


def test_the_file_holds_int8_weights_and_their_scales(int8_run):
    result, path, _ = int8_run
    meta = read_metadata(path)
    quant = meta["quantization"]
    assert meta["version"] == 3 and quant["scheme"] == "int8"
    with safe_open(str(path), framework="pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    described = set(quant["tensors"])
    assert {"conv.weight", "fc2.weight"} <= described  # layers left dense
    assert {k for k in dtypes if k.startswith("fc1.cores.")} <= described  # the factorized layer's cores
    assert {k for k, d in dtypes.items() if d == "I8"} == described
    for name, entry in quant["tensors"].items():
        assert entry["scale"] == scale_name(name) and dtypes[entry["scale"]] == "F32" and entry["dtype"] == "float32"
    assert {k: d for k, d in dtypes.items() if k.endswith("bias")} == {k: "F32" for k in dtypes if k.endswith("bias")}


def test_reload_gives_back_the_weights_and_outputs_bit_for_bit(int8_run):
    result, path, x = int8_run
    slim = load(path, DigitsNet)
    before, after = result.model.state_dict(), slim.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    for name, q in result.quantization.tensors.items():  # the weights are the dequantized int8 values
        assert torch.equal(after[name], q.dequantize()), name
    with torch.no_grad():
        assert torch.equal(result.model(x), slim(x))


def test_the_file_meets_the_target_in_bytes_on_disk(int8_run):
    result, path, _ = int8_run
    report = result.report
    stored = data_bytes(path)
    by_hand = sum(t.numel() * t.element_size() for t in load_file(str(path)).values())
    assert stored == by_hand == report.bytes
    assert report.dense_bytes == 4 * DENSE and report.target == 8.0
    assert 4 * DENSE / stored >= 8.0 and report.bytes_ratio == pytest.approx(4 * DENSE / stored)
    assert 1.5 < report.aimed_ratio < 3 and report.ratio >= report.aimed_ratio  # far fewer elements than 8x
    # the file records that element ratio: a served form may grow the model to it, not to dense / 8
    blueprint = read_blueprint(path)
    assert blueprint.target == 8.0 and blueprint.element_target() == report.aimed_ratio
    assert served_budget(read_metadata(path), blueprint) == int(blueprint.dense_params // report.aimed_ratio)
    assert report.quantize == "int8" and "max|w|/127" in report.quantizer
    assert report.accuracy is not None and report.accuracy > 0.8  # measured on the quantized weights


def test_saving_weights_changed_after_quantizing_is_refused(int8_run, tmp_path):
    result, _, _ = int8_run
    changed = copy.deepcopy(result.model)
    with torch.no_grad():
        changed.conv.weight.add_(1e-3)
    with pytest.raises(CheckpointError, match="no longer holds the weights it was quantized to"):
        save(changed, tmp_path / "x.safetensors", quantization=result.quantization)
    assert not (tmp_path / "x.safetensors").exists()


# ------------------------------------------------------------------ files whose int8 claims do not hold
def _rewrite(src: Path, dst: Path, change) -> Path:
    """``src`` written again as ``dst`` after ``change(tensors, meta)`` edits its tensors and metadata."""
    tensors = load_file(str(src))
    with safe_open(str(src), framework="pt") as f:
        header = dict(f.metadata())
    meta = json.loads(header["compressor"])
    change(tensors, meta)
    save_file(tensors, str(dst), metadata={"compressor": json.dumps(meta)})
    return dst


def _set(name, value):
    def change(tensors, meta):
        tensors[name] = value(tensors[name])
    return change


def _drop(name):
    def change(tensors, meta):
        del tensors[name]
    return change


def _undescribe(name):
    def change(tensors, meta):
        del tensors[scale_name(name)]
        del meta["quantization"]["tensors"][name]
    return change


def _spoil_scale(value):
    def change(tensors, meta):
        scale = tensors[scale_name("conv.weight")].clone()
        scale[0] = value
        tensors[scale_name("conv.weight")] = scale
    return change


TAMPERED = {
    "float stored": (_set("conv.weight", lambda t: t.float()), "is described as int8 but the file holds F32"),
    "int16 stored": (_set("fc1.cores.0", lambda t: t.to(torch.int16)), "is described as int8 but the file holds I16"),
    "scale too long": (_set(scale_name("conv.weight"), lambda s: torch.cat([s, s[:1]])),
                       "have shape [9], not [8] (one per slice along axis 0)"),
    "scale float64": (_set(scale_name("fc2.weight"), lambda s: s.double()), "must be float32, the file holds F64"),
    "scale missing": (_drop(scale_name("fc2.weight")), "of quantized tensor 'fc2.weight' are not in the file"),
    "int8 undescribed": (_undescribe("fc2.weight"), "holds int8 tensor 'fc2.weight' that its metadata does not"),
    "scale nan": (_spoil_scale(float("nan")), "hold a value that is not finite and positive"),
    "scale zero": (_spoil_scale(0.0), "hold a value that is not finite and positive"),
    "scale negative": (_spoil_scale(-1.0), "hold a value that is not finite and positive"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_file_whose_int8_claims_do_not_hold_is_one_error_line(int8_run, tmp_path, case):
    change, fragment = TAMPERED[case]
    bad = _rewrite(int8_run[1], tmp_path / "bad.safetensors", change)
    with pytest.raises(CheckpointError, match="^" + str(tmp_path).replace("\\", "\\\\")) as info:
        load(bad, DigitsNet)
    assert fragment in str(info.value)
    assert_one_error_line(invoke(["inspect", bad]), fragment)


def test_a_malformed_quantization_entry_is_one_error_line(int8_run, tmp_path):
    def change(tensors, meta):
        meta["quantization"]["tensors"]["conv.weight"]["axis"] = 4
    bad = _rewrite(int8_run[1], tmp_path / "bad.safetensors", change)
    assert_one_error_line(invoke(["inspect", bad]), "quantized tensor 'conv.weight' has a malformed entry")


# ------------------------------------------------------------------ the command
@pytest.fixture(scope="module")
def cli_files(trained_digits_net, digits, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_int8")
    xtr, ytr, xte, _ = digits
    program = torch.export.export(trained_digits_net, (xte[:4].clone(),), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(program, str(d / "model.pt2"))
    save_file({"inputs": xtr.contiguous(), "labels": ytr.contiguous()}, str(d / "data.safetensors"))
    return d


def test_quantize_int8_end_to_end_from_the_command_line(cli_files, tmp_path, monkeypatch):
    from compressor import cli

    monkeypatch.setattr(cli.out_console, "_width", 300)
    out = tmp_path / "slim.safetensors"
    r = invoke([cli_files / "model.pt2", "--target", "8x", "--quantize", "int8", "--data",
                cli_files / "data.safetensors", "-o", out, "--max-steps", "30", "--batch-size", "64"])
    assert r.exit_code == 0, r.output + r.stderr
    stored = data_bytes(out)
    assert f"int8 file {4 * DENSE / stored:.2f}x smaller than the dense float32 file: {stored:,} of " \
           f"{4 * DENSE:,} tensor bytes (target 8x in bytes" in r.stdout
    assert 4 * DENSE / stored >= 8
    quant = read_metadata(out)["quantization"]["tensors"]
    assert {"conv.weight", "fc2.weight"} <= set(quant)  # a torch.export graph's dense layers too

    r = invoke(["inspect", out])
    assert r.exit_code == 0, r.stderr
    assert f"file {out.stat().st_size:,} bytes, tensors {stored:,}, {len(quant)} of them int8" in r.stdout
    assert f"dense float32 {4 * DENSE:,} → {4 * DENSE / stored:.2f}x in bytes" in r.stdout

    r = invoke(["eval", out, "--data", cli_files / "data.safetensors", "--base", cli_files / "model.pt2"])
    assert r.exit_code == 0 and "accuracy (compressed)" in r.stdout, r.stderr


def test_a_byte_target_int8_alone_meets_is_one_error_line_on_the_command_line(cli_files, tmp_path):
    out = tmp_path / "slim.safetensors"
    r = invoke([cli_files / "model.pt2", "--target", "3x", "--quantize", "int8", "--data",
                cli_files / "data.safetensors", "-o", out])
    assert_one_error_line(r, "met by int8 quantization alone")
    assert not out.exists()
    assert_one_error_line(invoke([cli_files / "model.pt2", "--target", "8x", "--quantize", "int4", "--data",
                                  cli_files / "data.safetensors", "-o", out]), "unknown quantization 'int4'")


@pytest.mark.parametrize("shape,varied", [((1, 64, 8), 1), ((8, 64, 1), 1), ((6, 5, 7), 0), ((6, 5, 7), 2)])
def test_a_core_takes_the_side_whose_scales_leave_the_least_error(shape, varied):
    """A train's end core has a bond of 1: scaled along that bond it would share one scale (the
    old rule's 5 % perplexity loss on SmolLM2); its magnitudes vary along another side, which it takes."""
    torch.manual_seed(0)
    core = torch.randn(shape) * torch.logspace(-2, 1, shape[varied]).reshape(
        [-1 if d == varied else 1 for d in range(len(shape))])
    q = quantize_core(core)
    assert q.axis == varied and q.scale.shape == (shape[varied],)
    error = (q.dequantize() - core).square().sum()
    for axis in range(3):
        assert error <= (quantize_tensor(core, axis).dequantize() - core).square().sum()
