"""Issue 27: sizes a file claims are checked before they are believed, and missing or wrong data
is an error, not something used silently.

Every case builds its own tiny model (a random Llama / BERT / GPT-2 from its config, offline),
tampers with it as a hostile or careless user would, and expects one ``error:`` line (exit code
2, no traceback) or, for ``eval`` and ``inspect``, non-finite numbers reported as such.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import builders  # noqa: E402
from builders import random_sentences  # noqa: E402
from compressor import compress, load, save  # noqa: E402
from compressor.cli import main  # noqa: E402
from compressor.errors import CheckpointError, CompressorError, DataError, ModelError  # noqa: E402
from compressor.hf_folders import load_model_folder, text_data  # noqa: E402
from compressor.zoo import DigitsNet  # noqa: E402

WORDS = "the cat dog sat on a mat and ran to house big small red blue tree bird fish".split()
ROOT = Path(__file__).resolve().parent.parent


def sentences(n, seed=0):
    return random_sentences(WORDS, n, seed, longest=10)


def word_tokenizer():
    return builders.word_tokenizer(WORDS, eos_token="[SEP]")


def llama_config(**overrides):
    return transformers.LlamaConfig(**{**dict(vocab_size=len(WORDS) + 5, hidden_size=64, intermediate_size=128,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              tie_word_embeddings=True, pad_token_id=0, max_position_embeddings=64),
                                       **overrides})


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(result, *fragments):
    """The run ended with exactly one ``error:`` line, exit code 2 and no traceback; returns it.
    (transformers' "Loading weights" progress bar may come before it.)"""
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr, result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    assert "Traceback" not in result.output + result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def copy_folder(src: Path, dst: Path, config_edit=None) -> Path:
    """A copy of a model folder, its config.json edited by ``config_edit(dict)``."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    if config_edit is not None:
        config = json.loads((dst / "config.json").read_text())
        config_edit(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def edit_weights(folder: Path, edit, name="model.safetensors") -> Path:
    """Rewrite a folder's weights file with ``edit(tensors)`` applied, metadata kept."""
    path = folder / name
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama folder with a tokenizer, text, and that folder compressed (``slim``)."""
    d = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(llama_config()).eval().save_pretrained(d / "model")
    word_tokenizer().save_pretrained(d / "model")
    (d / "train.txt").write_text("\n".join(sentences(64)) + "\n")
    r = invoke(d / "model", "--data", d / "train.txt", "--target", "1.5x", "--max-steps", "4", "--max-length", "16",
               "--batch-size", "32", "-o", d / "slim")
    assert r.exit_code == 0, r.output + r.stderr
    return d


# ------------------------------------------------------------------ untrusted sizes
def _claim(key, value):
    return lambda config: config.update({key: value})


@pytest.mark.parametrize("key,value,fragment", [
    ("vocab_size", 10 ** 12, "vocab"),
    ("num_hidden_layers", 1_000_000, "layers"),
    ("hidden_size", 2 ** 20, "hidden"),
])
def test_a_slim_folder_whose_config_lies_is_one_error_line(llama, tmp_path, key, value, fragment):
    bad = copy_folder(llama / "slim", tmp_path / "bad", _claim(key, value))
    with pytest.raises(CompressorError) as err:
        load(bad)
    assert "\n" not in str(err.value) and "config.json" in str(err.value)
    one_error_line(invoke("eval", bad, "--data", llama / "train.txt"), "config.json")


@pytest.mark.parametrize("key,value,fragment", [
    ("num_hidden_layers", 1_000_000, "num_hidden_layers"),
    ("vocab_size", 10 ** 12, "parameters"),
    ("intermediate_size", 10 ** 9, "parameters"),
])
def test_an_input_folder_whose_config_lies_is_refused_before_it_is_built(llama, tmp_path, key, value, fragment):
    bad = copy_folder(llama / "model", tmp_path / "bad", _claim(key, value))
    with pytest.raises(ModelError, match=fragment) as err:
        load_model_folder(bad)
    assert "\n" not in str(err.value) and "config.json" in str(err.value)
    one_error_line(invoke(bad, "--data", llama / "train.txt", "--target", "2x", "-o", tmp_path / "out"), fragment)
    assert not (tmp_path / "out").exists()


def test_max_length_beyond_the_models_positions_is_one_error_line(llama, tmp_path):
    r = invoke(llama / "model", "--data", llama / "train.txt", "--target", "2x", "--max-length", 100_000,
               "-o", tmp_path / "out")
    one_error_line(r, "--max-length 100000", "max_position_embeddings", "64")
    r = invoke(llama / "model", "--data", llama / "train.txt", "--target", "2x", "--max-length", 65,
               "-o", tmp_path / "out")
    one_error_line(r, "64")
    assert not (tmp_path / "out").exists()


def test_the_default_max_length_is_the_models_positions_when_fewer(llama, tmp_path):
    """Without --max-length, text is cut at 128 tokens or the model's positions, whichever is less;
    ``compress eval`` on a folder does the same."""
    long_lines = tmp_path / "long.txt"
    long_lines.write_text("\n".join(" ".join(WORDS * 3) for _ in range(4)) + "\n")  # 54 tokens each
    assert text_data(str(long_lines), llama / "model", None, limit=16)[0]["input_ids"].shape[1] == 16
    assert text_data(str(long_lines), llama / "model", None, limit=None)[0]["input_ids"].shape[1] == 54
    with pytest.raises(DataError, match="16 positions"):
        text_data(str(long_lines), llama / "model", 17, limit=16)
    slim = copy_folder(llama / "slim", tmp_path / "slim", _claim("max_position_embeddings", 16))
    r = invoke("eval", slim, "--data", long_lines)
    assert r.exit_code == 0, (r.stderr, r.exception)
    assert "perplexity" in r.output


@pytest.fixture(scope="module")
def slim_digits(tmp_path_factory, trained_digits_net, digits):
    """A slim checkpoint of DigitsNet and the model file it came from (a state dict)."""
    from compressor.data import TensorLoader

    xtr, ytr, _, _ = digits
    d = tmp_path_factory.mktemp("digits")
    res = compress(trained_digits_net, TensorLoader(xtr, ytr, 64, shuffle=True, seed=0), "tt", 3, epochs=1, seed=0)
    save_file({k: v.contiguous() for k, v in trained_digits_net.state_dict().items()}, str(d / "dense.safetensors"))
    return save(res, d / "slim.safetensors"), d / "dense.safetensors"


def doctor(src: Path, dst: Path, meta_edit=None, tensor_edit=None, raw=None) -> Path:
    """A copy of a slim checkpoint with its metadata (``meta_edit(dict)``, or ``raw(json text)``) or
    tensors edited."""
    with safe_open(str(src), framework="pt") as f:
        text = f.metadata()["compressor"]
    meta = json.loads(text)
    tensors = load_file(str(src))
    if meta_edit:
        meta_edit(meta)
        text = json.dumps(meta)
    if raw:
        text = raw(text)
    if tensor_edit:
        tensor_edit(tensors)
    save_file(tensors, str(dst), metadata={"compressor": text})
    return dst


def _set(key, value):
    def edit(meta):
        meta[key] = value
    return edit


@pytest.mark.parametrize("edit,raw,fragment", [
    (_set("dense_params", 10 ** 400), None, "dense_params"),
    (None, lambda text: text.replace('"dense_params": ', '"dense_params": 1' + "0" * 5000 + ', "was": ', 1), "metadata"),
    (_set("extra", {"report": {"accuracy": 1e400}}), None, "accuracy"),
    (_set("extra", {"report": {"accuracy": float("nan")}}), None, "accuracy"),
    (lambda meta: meta["layers"]["fc1"]["spec"].update(in_features=10 ** 400), None, "fc1"),
], ids=["dense-1e400", "dense-5000-digits", "accuracy-inf", "accuracy-nan", "in-features-1e400"])
def test_huge_numbers_in_checkpoint_metadata_are_one_error_line(slim_digits, tmp_path, edit, raw, fragment):
    bad = doctor(slim_digits[0], tmp_path / "bad.safetensors", meta_edit=edit, raw=raw)
    one_error_line(invoke("inspect", bad), fragment)
    one_error_line(invoke("inspect", bad, "--json"), fragment)
    with pytest.raises(CheckpointError, match=fragment):
        load(bad, base=DigitsNet)


# ------------------------------------------------------------------ missing or wrong data
def test_an_input_folder_that_lacks_a_block_is_an_error_naming_the_tensors(llama, tmp_path):
    bad = copy_folder(llama / "model", tmp_path / "bad")
    edit_weights(bad, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.1.")])
    with pytest.raises(ModelError, match="model.layers.1.") as err:
        load_model_folder(bad)
    assert "\n" not in str(err.value)
    one_error_line(invoke(bad, "--data", llama / "train.txt", "--target", "2x", "-o", tmp_path / "out"),
                   "model.layers.1.")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit,fragments", [
    (lambda t: t.update({"model.layers.7.mlp.up_proj.weight": torch.zeros(4, 4)}), ["unexpected", "model.layers.7"]),
    (lambda t: t.update({"model.norm.scale": t.pop("model.norm.weight")}), ["missing", "model.norm.weight",
                                                                             "unexpected", "model.norm.scale"]),
], ids=["extra-tensor", "renamed-tensor"])
def test_an_input_folder_with_unexpected_or_renamed_tensors_is_an_error(llama, tmp_path, edit, fragments):
    bad = copy_folder(llama / "model", tmp_path / "bad")
    edit_weights(bad, edit)
    with pytest.raises(ModelError) as err:
        load_model_folder(bad)
    assert all(f in str(err.value) for f in fragments), str(err.value)
    one_error_line(invoke(bad, "--data", llama / "train.txt", "--target", "2x", "-o", tmp_path / "out"), *fragments)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_weight_is_one_error_naming_the_layer(trained_digits_net, digits, value):
    import copy

    from compressor.data import TensorLoader

    model = copy.deepcopy(trained_digits_net)
    with torch.no_grad():
        model.fc1.weight[3, 5] = value
    with pytest.raises(ModelError, match="fc1.weight") as err:
        compress(model, TensorLoader(digits[0], digits[1], 64), "tt", 3, epochs=1)
    assert "\n" not in str(err.value)


def test_a_folder_with_a_nan_weight_is_one_error_line_naming_the_layer(llama, tmp_path):
    bad = copy_folder(llama / "model", tmp_path / "bad")

    def poison(t):
        t["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    edit_weights(bad, poison)
    one_error_line(invoke(bad, "--data", llama / "train.txt", "--target", "2x", "-o", tmp_path / "out"),
                   "model.layers.0.mlp.down_proj.weight")


def _poison_cores(tensors):
    for k in tensors:
        if k.startswith("fc1.cores."):
            tensors[k] = torch.full_like(tensors[k], float("nan"))


def test_eval_and_inspect_report_non_finite_outputs_and_tensors(slim_digits, tmp_path):
    checkpoint, dense = slim_digits
    bad = doctor(checkpoint, tmp_path / "nan.safetensors", tensor_edit=_poison_cores)
    r = CliRunner().invoke(main, ["eval", str(bad), "--data", "digits", "--base", str(dense),
                                  "--arch", "compressor.zoo:digits_net"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, (r.stderr, r.exception)
    out = " ".join(r.output.split())
    assert "0.0000" not in out and "not finite" in out, out
    r = CliRunner().invoke(main, ["eval", str(bad), "--data", "digits", "--arch", "compressor.zoo:digits_net"],
                           env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "not finite" in " ".join(r.output.split()), r.output
    r = CliRunner().invoke(main, ["inspect", str(bad)], env={"COLUMNS": "200"})
    out = " ".join(r.output.split())
    assert r.exit_code == 0 and "not finite" in out and "fc1.cores.0" in out, out
    r = CliRunner().invoke(main, ["inspect", str(bad), "--json"])
    assert "fc1.cores.0" in json.loads(r.output)["nonfinite_tensors"]
    fine = CliRunner().invoke(main, ["inspect", str(checkpoint)], env={"COLUMNS": "200"})
    assert fine.exit_code == 0 and "not finite" not in fine.output


def test_eval_of_a_folder_reports_non_finite_perplexity(llama, tmp_path):
    bad = copy_folder(llama / "slim", tmp_path / "nan")
    edit_weights(bad, lambda t: t.update({k: torch.full_like(v, float("nan")) for k, v in t.items()
                                          if k.startswith("model.norm")}), name="model.slim.safetensors")
    r = CliRunner().invoke(main, ["eval", str(bad), "--data", str(llama / "train.txt"), "--base", str(llama / "model")],
                           env={"COLUMNS": "200"})
    assert r.exit_code == 0, (r.stderr, r.exception)
    out = " ".join(r.output.split())
    assert "perplexity (compressed) │ not finite" in out and "perplexity (original) │ not" not in out, out
    assert "with original │ not finite" in out, out


# ------------------------------------------------------------------ memory
PEAK = textwrap.dedent("""
    import resource, sys
    from compressor.cli import main
    try:
        main(["eval", sys.argv[1], "--data", sys.argv[2]])
    except SystemExit as stop:
        code = stop.code
    print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "CODE", code)
""")


def test_eval_of_a_folder_claiming_a_huge_vocabulary_stays_small(llama, tmp_path):
    """Peak memory (ru_maxrss, in a fresh process) of ``compress eval`` on a slim folder whose config
    claims 10^12 tokens stays below 1 GB: the lie is found on the meta device."""
    bad = copy_folder(llama / "slim", tmp_path / "bad", _claim("vocab_size", 10 ** 12))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", PEAK, str(bad), str(llama / "train.txt")], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)
    line = [l for l in done.stdout.splitlines() if l.startswith("PEAK_KB")][-1].split()
    peak_kb, code = int(line[1]), int(line[3])
    assert code == 2 and "error: " in done.stderr and "config.json" in done.stderr, done.stderr[-500:]
    assert peak_kb < 1_000_000, f"peak {peak_kb / 1e6:.2f} GB"
