"""No code runs from a user's file unless they say so; a checkpoint's metadata is never trusted.

The archives here are real attacks: each rewrites a clean ``torch.export`` archive so that
loading it creates a marker file. Without ``--trust-pickle`` the marker must not appear and
the failure is one line; with it, the marker appears, which proves torch.export.load (and
the code path the flag guards) was really reached.
"""

import io
import json
import operator
import pathlib
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from compressor import compress, load, save
from compressor.checkpoint import read_metadata
from compressor.cli import main
from compressor.data import TensorLoader
from compressor.errors import CheckpointError, ModelError
from compressor.layers import TNLayer
from compressor.model_files import load_model
from compressor.zoo import DigitsNet

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ payloads
class Touch:
    """Unpickling this creates ``path``: the stand-in for arbitrary code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


class TouchThen:
    """Unpickles to ``value`` after creating ``path``, so the archive still loads when trusted."""

    def __init__(self, path, value):
        self.path, self.value = path, value

    def __reduce__(self):
        return (operator.getitem, ((Touch(self.path), self.value), 1))


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _entry(files, suffix):
    return next(n for n in files if n.endswith(suffix))


def pickled_weight(files, marker):
    """Mark the first weight ``use_pickle`` and replace its data by a pickle (torch.export.load
    then calls ``torch.load(..., weights_only=False)`` on it)."""
    config_name = _entry(files, "data/weights/model_weights_config.json")
    config = json.loads(files[config_name])
    fqn, meta = next(iter(config["config"].items()))
    data_name = config_name.rsplit("/", 1)[0] + "/" + meta["path_name"]
    sizes = [s["as_int"] for s in meta["tensor_meta"]["sizes"]]
    value = nn.Parameter(torch.frombuffer(bytearray(files[data_name]), dtype=torch.float32).reshape(sizes).clone())
    meta["use_pickle"] = True
    files[data_name] = _saved(TouchThen(marker, value))
    files[config_name] = json.dumps(config).encode()


def pickled_sample_inputs(files, marker):
    """torch retries sample inputs that fail the safe load with ``weights_only=False``."""
    name = _entry(files, "data/sample_inputs/model.pt")
    value = torch.load(io.BytesIO(files[name]), weights_only=True)
    files[name] = _saved(TouchThen(marker, value))


def opaque_constant(files, marker):
    """An ``opaque_obj_`` constant is read with plain ``pickle.loads``."""
    config_name = _entry(files, "data/constants/model_constants_config.json")
    config = json.loads(files[config_name])
    config["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
    files[config_name.rsplit("/", 1)[0] + "/opaque_obj_0"] = pickle.dumps(Touch(marker))
    files[config_name] = json.dumps(config).encode()


def sympy_expression(files, marker):
    """Shape expressions are ``sympy.sympify``d, which evals them."""
    name = _entry(files, "models/model.json")
    text = files[name].decode()
    symbol = text.split('"expr_str": "', 1)[1].split('"', 1)[0]
    evil = f"(__import__('pathlib').Path('{marker}').touch(), {symbol})[1]"
    files[name] = text.replace(f'"expr_str": "{symbol}"', json.dumps({"expr_str": evil})[1:-1]).encode()


def guard_code(files, marker):
    """Guards are exec'd as Python when the program is turned into a module and run."""
    name = _entry(files, "models/model.json")
    program = json.loads(files[name])
    program["guards_code"] = [f"__import__('pathlib').Path('{marker}').touch() is None"]
    files[name] = json.dumps(program).encode()


def argument_name(files, marker):
    """A higher-order op's keyword names are pasted unquoted into the Python fx generates."""
    name = _entry(files, "models/model.json")
    program = json.loads(files[name])
    key = f"*[__import__('pathlib').Path('{marker}').touch()], format_str"
    program["graph_module"]["graph"]["nodes"].insert(0, {
        "target": "torch.ops.higher_order.print", "inputs": [{"name": key, "arg": {"as_string": "hi"}, "kind": 2}],
        "outputs": [{"as_none": True}], "metadata": {}, "is_hop_single_tensor_return": None, "name": "evil"})
    files[name] = json.dumps(program).encode()


def forward_argument_name(files, marker):
    """``forward_arg_names`` are pasted into the generated ``def forward(...)`` (refused; the
    same names also land in the body, so this one only breaks the syntax here)."""
    name = _entry(files, "models/model.json")
    program = json.loads(files[name])
    signature = program["graph_module"]["module_call_graph"][0]["signature"]
    signature["forward_arg_names"] = [f"x=__import__('pathlib').Path('{marker}').touch()"]
    files[name] = json.dumps(program).encode()


ATTACKS = [pickled_weight, pickled_sample_inputs, opaque_constant, sympy_expression, guard_code, argument_name]


def rewrite(clean: bytes, target: Path, edit, marker) -> Path:
    """``clean`` with ``edit(files, marker)`` applied, written to ``target``."""
    with zipfile.ZipFile(io.BytesIO(clean)) as zin:
        files = {i.filename: zin.read(i.filename) for i in zin.infolist()}
    edit(files, marker)
    with zipfile.ZipFile(target, "w") as zout:
        for name, data in files.items():
            zout.writestr(name, data)
    return target


# ------------------------------------------------------------------ fixtures and helpers
@pytest.fixture(scope="module")
def clean(trained_digits_net, digits):
    """A normal torch.export archive of the trained DigitsNet (dynamic batch)."""
    xte = digits[2]
    ep = torch.export.export(trained_digits_net, (xte[:4].clone(),), dynamic_shapes=({0: torch.export.Dim("b")},))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def slim(tmp_path_factory, trained_digits_net, digits):
    """A real slim checkpoint of DigitsNet (fc1 factorized) and the model it came from."""
    xtr, ytr, _, _ = digits
    res = compress(trained_digits_net, TensorLoader(xtr, ytr, 64, shuffle=True, seed=0), "tt", 3, epochs=1, seed=0)
    path = save(res, tmp_path_factory.mktemp("slim") / "slim.safetensors")
    return path, res.model


@pytest.fixture(scope="module")
def slim_from_program(tmp_path_factory, clean, digits):
    """A slim checkpoint compressed from the clean archive: its base is a .pt2 (``eval --base``)."""
    xtr, ytr, _, _ = digits
    program = torch.export.load(io.BytesIO(clean))
    res = compress(program, TensorLoader(xtr, ytr, 64, shuffle=True, seed=0), "tt", 3, epochs=1, seed=0)
    path = save(res, tmp_path_factory.mktemp("slim_pt2") / "slim.safetensors")
    return path, res.model


@pytest.fixture
def attack(clean, tmp_path):
    """Make the archive of one attack; returns (path, marker)."""
    def make(edit):
        marker = tmp_path / f"ran-{edit.__name__}"
        return rewrite(clean, tmp_path / f"{edit.__name__}.pt2", edit, marker), marker
    return make


def invoke(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output + result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def doctor(src: Path, dst: Path, meta_edit=None, tensor_edit=None) -> Path:
    """Rewrite a checkpoint's JSON metadata and/or tensors (what an attacker can do)."""
    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["compressor"])
    tensors = load_file(str(src))
    if meta_edit:
        meta_edit(meta)
    if tensor_edit:
        tensor_edit(tensors)
    save_file(tensors, str(dst), metadata={"compressor": json.dumps(meta)})
    return dst


# ------------------------------------------------------------------ 1. code in a .pt2
@pytest.mark.parametrize("edit", ATTACKS, ids=lambda e: e.__name__)
def test_archive_that_runs_code_is_refused_and_runs_when_trusted(attack, digits, edit):
    path, marker = attack(edit)
    with pytest.raises(ModelError) as err:
        load_model(path)
    assert not marker.exists(), "the payload ran although the archive was refused"
    message = str(err.value)
    assert "\n" not in message and "--trust-pickle" in message and "was not loaded" in message
    # The same file with the flag reaches torch.export.load, and the payload really runs.
    try:
        load_model(path, trust_pickle=True).module()(digits[2][:3])
    except Exception:
        pass  # some payloads leave a program torch cannot finish (returning None); they already ran
    assert marker.exists()


def test_cli_run_refuses_pickled_pt2_and_runs_it_with_the_flag(attack, tmp_path):
    path, marker = attack(pickled_weight)
    out = tmp_path / "slim.safetensors"
    assert_one_line_error(invoke([path, "--target", "3", "--data", "digits", "-o", out]),
                          "as a pickle", "--trust-pickle")
    assert not marker.exists() and not out.exists()
    r = invoke([path, "--trust-pickle", "--target", "3", "--data", "digits", "-o", out, "--epochs", "1"])
    assert r.exit_code == 0, r.stderr
    assert marker.exists() and out.exists()


def test_eval_base_refuses_pickled_pt2_and_loads_it_with_the_flag(attack, slim_from_program):
    path, marker = attack(pickled_weight)
    checkpoint, _ = slim_from_program
    r = invoke(["inspect", checkpoint])  # the checkpoint itself is fine
    assert r.exit_code == 0, r.stderr
    assert_one_line_error(invoke(["eval", checkpoint, "--data", "digits", "--base", path]),
                          "as a pickle", "--trust-pickle")
    assert not marker.exists()
    r = invoke(["eval", checkpoint, "--data", "digits", "--base", path, "--trust-pickle"])
    assert r.exit_code == 0, r.stderr
    assert marker.exists() and "agreement" in r.stdout


def test_python_load_with_pt2_base_needs_trust(attack, slim_from_program, digits):
    path, marker = attack(pickled_weight)
    checkpoint, model = slim_from_program
    with pytest.raises(ModelError, match="--trust-pickle"):
        load(checkpoint, base=path)
    with pytest.raises(ModelError, match="--trust-pickle"):
        load(checkpoint, base=str(path))
    assert not marker.exists()
    back = load(checkpoint, base=path, trust_pickle=True)
    assert marker.exists()
    x = digits[2][:16]
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_archive_with_compiled_code_or_foreign_entries_is_refused(clean, tmp_path):
    def aoti(files, _):
        files[_entry(files, "archive_format").rsplit("/", 1)[0] + "/data/aotinductor/model/model.so"] = b"\x7fELF"

    def legacy(files, _):
        files[_entry(files, "archive_format").rsplit("/", 1)[0] + "/data/weights/model.pt"] = _saved({})

    refused = ((aoti, "compiled code"), (legacy, "not plain tensors"), (forward_argument_name, "plain identifier"))
    for edit, fragment in refused:
        path = rewrite(clean, tmp_path / f"{edit.__name__}.pt2", edit, tmp_path / "ran")
        with pytest.raises(ModelError, match=fragment):
            load_model(path)


def test_clean_archives_still_load_without_the_flag(clean, tmp_path, digits):
    path = tmp_path / "clean.pt2"
    path.write_bytes(clean)
    assert load_model(path).module()(digits[2][:5]).shape == (5, 10)
    assert load_model(ROOT / "examples" / "lenet5.pt2").module()(torch.rand(2, 1, 28, 28)).shape == (2, 10)

    class Reshaping(nn.Module):  # dynamic shapes with shape expressions and a guard
        def forward(self, x):
            return x.reshape(x.shape[0] // 2, -1).sum(1) * (x.shape[1] % 5)

    ep = torch.export.export(Reshaping(), (torch.randn(8, 3),),
                             dynamic_shapes=({0: 2 * torch.export.Dim("d", min=2, max=512), 1: torch.export.Dim.AUTO},))
    torch.export.save(ep, str(tmp_path / "dyn.pt2"))
    assert load_model(tmp_path / "dyn.pt2").module()(torch.randn(6, 3)).shape == (3,)


# ------------------------------------------------------------------ 2. checkpoint metadata
def _no_rebuild(monkeypatch):
    """Fail the test if any factorized layer would be built (that is where memory goes)."""
    def boom(cls, spec):
        raise AssertionError("a layer was built from unchecked metadata")
    monkeypatch.setattr(TNLayer, "from_spec", classmethod(boom))


def test_huge_ranks_fail_fast_without_allocating(slim, tmp_path, monkeypatch):
    checkpoint, _ = slim

    def huge(meta):
        spec = meta["layers"]["fc1"]["spec"]
        spec["ranks"] = [100_000] * (len(spec["ranks"]) - 1) + [spec["ranks"][-1]]

    bad = doctor(checkpoint, tmp_path / "huge.safetensors", meta_edit=huge)
    _no_rebuild(monkeypatch)
    with pytest.raises(CheckpointError, match="'fc1'") as err:
        load(bad, base=DigitsNet)
    assert "\n" not in str(err.value)
    assert_one_line_error(invoke(["inspect", bad]), "'fc1'")
    assert_one_line_error(invoke(["inspect", bad, "--json"]), "'fc1'")


def _set_spec(key, value):
    def edit(meta):
        meta["layers"]["fc1"]["spec"][key] = value
    return edit


def _set_meta(key, value):
    def edit(meta):
        meta[key] = value
    return edit


MALFORMED = [
    (_set_spec("ranks", ["a", "b", "c"]), "fc1"),
    (_set_spec("ranks", [-4, -4, 1]), "fc1"),
    (_set_spec("ranks", [2.5, 2.5, 1]), "fc1"),
    (_set_spec("ranks", [1]), "fc1"),
    (_set_spec("in_features", -512), "fc1"),
    (_set_spec("in_modes", "888"), "fc1"),
    (_set_spec("bias", "yes"), "fc1"),
    (_set_spec("kind", "conv9d"), "fc1"),
    (_set_spec("decomp", 5), "fc1"),
    (lambda meta: meta["layers"].update(fc1="not a spec"), "fc1"),
    (lambda meta: meta["layers"]["fc1"]["spec"].pop("out_modes"), "fc1"),
    (_set_meta("dense_params", "many"), "dense_params"),
    (_set_meta("version", "1"), "version"),
    (_set_meta("extra", {"report": {"accuracy": "high"}}), "accuracy"),
    (_set_meta("extra", {"arch": ["os:system"]}), "arch"),
]


@pytest.mark.parametrize("edit,fragment", MALFORMED)
def test_malformed_metadata_is_one_line(slim, tmp_path, monkeypatch, edit, fragment):
    checkpoint, _ = slim
    bad = doctor(checkpoint, tmp_path / "bad.safetensors", meta_edit=edit)
    _no_rebuild(monkeypatch)
    with pytest.raises(CheckpointError, match=fragment):
        load(bad, base=DigitsNet)
    assert_one_line_error(invoke(["inspect", bad]), fragment)


def _resize_core(tensors):
    core = tensors["fc1.cores.1"]
    tensors["fc1.cores.1"] = torch.zeros(core.shape[0], core.shape[1], core.shape[2] + 1)


TAMPERED = [
    (_resize_core, "but the file holds"),
    (lambda t: t.pop("fc1.cores.0"), "lacks tensor 'fc1.cores.0'"),
    (lambda t: t.pop("fc1.bias"), "lacks tensor 'fc1.bias'"),
    (lambda t: t.update({"fc1.cores.9": torch.zeros(1, 2, 1)}), "'fc1.cores.9'"),
]


@pytest.mark.parametrize("edit,fragment", TAMPERED)
def test_tensors_that_do_not_match_the_spec(slim, tmp_path, monkeypatch, edit, fragment):
    checkpoint, _ = slim
    bad = doctor(checkpoint, tmp_path / "bad.safetensors", tensor_edit=edit)
    _no_rebuild(monkeypatch)
    with pytest.raises(CheckpointError, match=fragment):
        read_metadata(bad)
    with pytest.raises(CheckpointError, match="'fc1'"):
        load(bad, base=DigitsNet)
    assert_one_line_error(invoke(["inspect", bad]), "'fc1'", fragment)


def test_dense_layer_size_mismatch_is_one_line(slim, tmp_path):
    checkpoint, _ = slim

    def bigger_conv(tensors):
        tensors["conv.weight"] = torch.zeros(8, 1, 5, 5)

    bad = doctor(checkpoint, tmp_path / "dense.safetensors", tensor_edit=bigger_conv)
    with pytest.raises(CheckpointError, match="size mismatch for conv.weight") as err:
        load(bad, base=DigitsNet)
    assert "\n" not in str(err.value)


def test_normal_checkpoint_still_loads_and_inspects(slim, digits):
    checkpoint, model = slim
    back = load(checkpoint, base=DigitsNet)
    x = digits[2][:32]
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    r = invoke(["inspect", checkpoint])
    assert r.exit_code == 0, r.stderr
    assert "fc1" in r.stdout
    assert isinstance(read_metadata(checkpoint)["layers"]["fc1"]["spec"]["ranks"], list)
