"""Hugging Face model folders in and out: tokenized text data, a compressed folder that loads alone."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from click.testing import CliRunner  # noqa: E402
from safetensors import safe_open  # noqa: E402

import builders  # noqa: E402
from builders import random_sentences  # noqa: E402
from compressor import compress, load  # noqa: E402
from compressor.cli import main  # noqa: E402
from compressor.errors import DataError, ModelError  # noqa: E402
from compressor.hf_folders import load_model_folder, mean_cosine, perplexity, text_data  # noqa: E402

WORDS = ("the cat dog sat on a mat and ran to house big small red blue tree under over quickly slowly "
         "bird fish eats sleeps sees near far green old young").split()


def sentences(n, seed=0):
    return random_sentences(WORDS, n, seed, longest=12)


def word_tokenizer():
    return builders.word_tokenizer(WORDS)


def low_rank_(model, rank=6, seed=0):
    """Give a random model's matrices low rank plus a little noise, as trained weights tend to have."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and min(p.shape) > rank:
                a, b = torch.randn(p.shape[0], rank, generator=g), torch.randn(rank, p.shape[1], generator=g)
                p.copy_((a @ b) / rank ** 0.5 * 0.1 + 0.002 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)
    low_rank_(transformers.BertModel(cfg)).eval().save_pretrained(d / "model")
    word_tokenizer().save_pretrained(d / "model")
    (d / "train.txt").write_text("\n".join(sentences(200)) + "\n")
    return d


def test_folder_reads_safetensors_and_refuses_pickles_and_remote_code(bert_folder, tmp_path):
    model = load_model_folder(bert_folder / "model")
    assert type(model).__name__ == "BertModel" and not model.training
    with pytest.raises(ModelError, match="without config.json"):
        load_model_folder(tmp_path)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((bert_folder / "model" / "config.json").read_text())
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ModelError, match="--trust-pickle"):
        load_model_folder(pickled)
    remote = tmp_path / "remote"
    remote.mkdir()
    cfg = json.loads((bert_folder / "model" / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "evil.Model"}}))
    with pytest.raises(ModelError, match="never runs code"):
        load_model_folder(remote)


def test_text_data_is_tokenized_with_the_folder_tokenizer(bert_folder, tmp_path):
    train, test = text_data(str(bert_folder / "train.txt"), bert_folder / "model", max_length=16)
    assert train["input_ids"].shape[0] == 180 and test["input_ids"].shape[0] == 20
    assert train["input_ids"].shape[1] <= 16 and set(train) == {"input_ids", "attention_mask"}
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(DataError, match="no non-empty line"):
        text_data(str(empty), bert_folder / "model", max_length=16)


def test_cli_folder_in_folder_out_and_load_alone(bert_folder, tmp_path):
    out = tmp_path / "slim"
    r = CliRunner().invoke(main, [str(bert_folder / "model"), "--data", str(bert_folder / "train.txt"),
                                  "--target", "2x", "--epochs", "1", "--max-length", "16", "--batch-size", "32",
                                  "-o", str(out), "--report-json", str(tmp_path / "report.json")])
    assert r.exit_code == 0, r.output + r.stderr
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.slim.safetensors", "tokenizer.json"}
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ratio"] >= 2.0
    slim = load(out)  # from the folder alone: no base model given
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    batch = tok(sentences(4, seed=9), padding=True, return_tensors="pt")
    again = load(out)
    with torch.no_grad():
        a, b = slim(**batch).last_hidden_state, again(**batch).last_hidden_state
    assert torch.equal(a, b) and a.shape[-1] == 64
    inspect = CliRunner().invoke(main, ["inspect", str(out)])
    assert inspect.exit_code == 0, inspect.stderr
    assert f"{report['params']:,} parameters" in " ".join(inspect.output.split())
    evaluated = CliRunner().invoke(main, ["eval", str(out), "--data", str(bert_folder / "train.txt")])
    assert evaluated.exit_code == 2 and "--base" in evaluated.stderr  # an encoder: nothing to measure alone
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n".join(sentences(12, seed=7)))
    evaluated = CliRunner().invoke(main, ["eval", str(out), "--data", str(held_out), "--base", str(bert_folder / "model")],
                                   env={"COLUMNS": "200"})
    assert evaluated.exit_code == 0, evaluated.stderr
    cosine = float(" ".join(evaluated.output.split()).split("with original")[1].split()[1])
    original = load_model_folder(bert_folder / "model")
    inputs = tok(sentences(12, seed=7), padding=True, truncation=True, max_length=128, return_tensors="pt")
    assert cosine == pytest.approx(mean_cosine(slim, original, dict(inputs)), abs=1e-4) and 0.5 < cosine <= 1.0
    with torch.no_grad():  # the same figure computed here: mask-weighted mean of the last hidden states, then cosine
        m = inputs["attention_mask"][..., None].float()
        pooled = [(net(**inputs).last_hidden_state * m).sum(1) / m.sum(1) for net in (slim, original)]
        by_hand = float(((pooled[0] * pooled[1]).sum(-1) / (pooled[0].norm(dim=-1) * pooled[1].norm(dim=-1))).mean())
    assert cosine == pytest.approx(by_hand, abs=1e-4)


def test_cli_folder_bad_inputs(bert_folder, tmp_path):
    r = CliRunner().invoke(main, [str(tmp_path), "--data", str(bert_folder / "train.txt"), "--target", "2x"])
    assert r.exit_code == 2 and "without config.json" in r.stderr
    r = CliRunner().invoke(main, [str(bert_folder / "model"), "--data", "digits", "--target", "2x"])
    assert r.exit_code == 2 and "text" in r.stderr
    r = CliRunner().invoke(main, [str(bert_folder / "model"), "--data", str(bert_folder / "train.txt"),
                                  "--target", "2x", "-o", str(bert_folder / "model")])
    assert r.exit_code == 2 and "input model folder" in r.stderr


def tokenized_batches(tokenizer, n_batches, seed, labels=False):
    texts = sentences(16 * n_batches, seed=seed)
    out = []
    for i in range(n_batches):
        b = dict(tokenizer(texts[16 * i:16 * (i + 1)], padding=True, return_tensors="pt"))
        if labels:
            b["labels"] = b["input_ids"].clone()
        out.append(b)
    return out


@pytest.mark.parametrize("kind", ["encoder", "causal-lm"])
def test_api_on_tiny_transformers_with_tokenizer_dicts(kind, tmp_path):
    from compressor import save
    from compressor.plan import count_state

    torch.manual_seed(0)
    tok = word_tokenizer()
    if kind == "encoder":
        cfg = transformers.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)
        model = low_rank_(transformers.BertModel(cfg)).eval()
    else:
        cfg = transformers.LlamaConfig(vocab_size=len(WORDS) + 5, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       tie_word_embeddings=True, pad_token_id=0)
        model = low_rank_(transformers.LlamaForCausalLM(cfg)).eval()
    causal = kind == "causal-lm"
    train = tokenized_batches(tok, 8, seed=0, labels=causal)
    result = compress(model, train, target="2x", epochs=2, min_params=500)
    assert result.report.source == "export"
    assert 2.0 <= result.report.ratio <= 2.1  # 2.003 measured for both
    path = save(result, tmp_path / "slim.safetensors")
    if causal:  # the tied embedding/head: one set of cores, stored once
        assert result.model.lm_head.source is result.model.model.embed_tokens
    with safe_open(str(path), framework="pt") as f:
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert stored == count_state(result.model) == result.report.params
    base = (transformers.LlamaForCausalLM if causal else transformers.BertModel)(cfg)
    back = load(path, base=base).eval()
    batch = tokenized_batches(tok, 1, seed=5)[0]
    with torch.no_grad():
        a, b = result.model.eval()(**batch), back(**batch)
    key = "logits" if causal else "last_hidden_state"
    assert float((a[key] - b[key]).abs().max()) <= 1e-5


def test_perplexity_is_the_models_own_loss(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 40, (3, 8))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        loss = model(**inputs, labels=ids).loss
    assert perplexity(model, inputs) == pytest.approx(float(torch.exp(loss)), rel=1e-5)


# ------------------------------------------------------------------ files outside the folder never leak out
def _model_copy(bert_folder, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(bert_folder / "model", model)
    secret = tmp_path / "secret.txt"
    secret.write_text("a private key\n")
    return model, secret


@pytest.mark.parametrize("name", ["vocab.txt", "merges.txt", "generation_config.json"])
def test_a_folder_file_linked_outside_the_folder_is_refused(bert_folder, tmp_path, name):
    model, secret = _model_copy(bert_folder, tmp_path)
    (model / name).symlink_to(secret)
    out = tmp_path / "slim"
    r = CliRunner().invoke(main, [str(model), "--data", str(bert_folder / "train.txt"), "--target", "2x",
                                  "--epochs", "1", "--max-length", "16", "-o", str(out)])
    assert r.exit_code == 2, (r.exit_code, r.stderr)  # before: the secret was copied into the output folder
    assert r.stderr.strip().startswith("error:") and "\n" not in r.stderr.strip(), r.stderr
    assert f"{name} in {model} is a link to {secret}, outside the model folder" in r.stderr
    assert not out.exists()


def test_links_inside_the_folder_or_its_hub_cache_entry_are_its_own(bert_folder, tmp_path):
    from compressor.hf_folders import folder_copies, own_file

    model, secret = _model_copy(bert_folder, tmp_path)
    (model / "sub").mkdir()
    (model / "tokenizer.json").rename(model / "sub" / "tokenizer.json")
    (model / "tokenizer.json").symlink_to(Path("sub") / "tokenizer.json")
    assert model / "tokenizer.json" in folder_copies(model)
    entry = tmp_path / "hub" / "models--org--tiny"  # what huggingface_hub's cache looks like
    snapshot, blobs = entry / "snapshots" / "0123abc", entry / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    (blobs / "f00d").write_text((model / "config.json").read_text())
    (snapshot / "config.json").symlink_to(Path("..") / ".." / "blobs" / "f00d")
    assert folder_copies(snapshot) == [snapshot / "config.json"]
    (snapshot / "vocab.txt").symlink_to(secret)
    with pytest.raises(ModelError, match="vocab.txt in .* is a link to .*secret.txt, outside the model folder"):
        folder_copies(snapshot)
    with pytest.raises(ModelError, match="outside the model folder"):
        own_file(snapshot, "vocab.txt")


def test_a_compressed_folder_honours_the_umask(bert_folder, tmp_path):
    out = tmp_path / "slim"
    old = os.umask(0o022)
    try:
        r = CliRunner().invoke(main, [str(bert_folder / "model"), "--data", str(bert_folder / "train.txt"),
                                      "--target", "2x", "--epochs", "1", "--max-length", "16", "--batch-size", "64",
                                      "-o", str(out)])
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.stderr
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
    assert "tokenizer.json" in modes and set(modes.values()) == {"0o644"}, modes  # before: 0o600 everywhere
