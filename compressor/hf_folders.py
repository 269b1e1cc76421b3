"""Hugging Face model folders in, and text tokenized with the folder's own tokenizer.

A folder is what ``save_pretrained`` writes: ``config.json``, the weights as safetensors,
optionally tokenizer files. Reading one never runs code from it: remote code is refused,
and pickled weights (``pytorch_model.bin``) only load with ``trust_pickle``.
``transformers`` is an optional dependency (``pip install "compressor[hf]"``), imported
only here and only when a folder is used.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from . import checkpoint
from .batches import forward, predicts_next_token
from .data import TensorLoader
from .errors import CheckpointError, DataError, ModelError, first_line
from .files import read_safetensors_header
from .forms import check_form
from .losses import count_correct, label_loss

HF_HINT = 'install the Hugging Face extra: pip install "compressor[hf]"'
#: The slim checkpoint inside a compressed model folder.
SLIM_CHECKPOINT = "model.slim.safetensors"
#: Files a model folder's tokenizer may consist of (copied next to a compressed model).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "generation_config.json")
#: Tokens per text example unless told otherwise (fewer if the model has fewer positions).
TEXT_MAX_LENGTH = 128
#: Config fields that count repeated modules: even on the ``meta`` device each costs Python memory.
COUNT_FIELDS = ("num_hidden_layers", "num_layers", "num_decoder_layers", "encoder_layers", "decoder_layers",
                "num_local_experts", "num_experts")
#: Buffers (position ids, rotary frequencies, masks) a config may ask for beyond what the weights hold.
BUFFER_ALLOWANCE = 2 ** 26


def transformers_module(what: str) -> Any:
    """The ``transformers`` package, or a one-line error saying how to get it."""
    try:
        import transformers
    except ImportError:
        raise ModelError(f"{what} needs the transformers package; {HF_HINT}") from None
    return transformers


def is_model_folder(path: str | os.PathLike) -> bool:
    return Path(path).is_dir()


def _config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelError(f"{folder} is a directory without config.json: not a Hugging Face model folder")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} is not readable JSON ({first_line(exc, 160)})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path} does not hold a model configuration")
    if config.get("auto_map"):
        raise ModelError(f"{folder} needs custom code from the folder (auto_map in config.json); compressor "
                         "never runs code from a model folder")
    return config


def model_class(folder: Path, transformers: Any) -> tuple[Any, Any]:
    """(configuration, model class) of a folder, chosen by its ``architectures`` entry."""
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
    except Exception as exc:
        raise ModelError(f"transformers cannot build the model in {folder} ({first_line(exc, 200)})") from None
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None or not issubclass(cls, transformers.PreTrainedModel):
        cls = transformers.AutoModel
    return config, cls


def _weight_shapes(files: list[Path], error: type[CheckpointError] | type[ModelError]) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of safetensors files, from their headers alone."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        shapes.update(read_safetensors_header(f, error, "weights file")[1])
    return shapes


def _check_counts(folder: Path, config: Any, names: list[str]) -> None:
    """No count of repeated modules in the config (layers, experts) is far beyond what the weights'
    tensor names can hold (twice the highest index, plus 16): checked before anything is built, as
    even a ``meta`` build costs memory per module. A smaller excess is found, with the names of the
    tensors the weights lack, once the model is sized on ``meta``."""
    indices = [int(part) for name in names for part in name.split(".") if part.isdigit() and len(part) < 12]
    most = max(indices, default=-1) + 1
    for field in COUNT_FIELDS:
        value = getattr(config, field, None)
        if type(value) is int and value > 2 * most + 16:
            raise ModelError(f"{folder / 'config.json'} claims {field} = {value:,}, but its weights hold at most "
                             f"{most} of them: the config does not describe these weights")


def _skeleton(folder: Path, cls: Any, config: Any, names: list[str]) -> nn.Module:
    """The model ``config`` describes, built on the ``meta`` device: its sizes, without memory."""
    _check_counts(folder, config, names)
    try:
        with torch.device("meta"):
            model = cls(config)
            model.tie_weights()
    except Exception as exc:
        raise ModelError(f"transformers cannot build the model in {folder} ({first_line(exc, 200)})") from None
    return model


def _check_buffers(folder: Path, skeleton: nn.Module, held: int) -> None:
    """The buffers the config asks for (built for real, as their values are computed, not loaded)
    are not far larger than the weights."""
    wanted = sum(b.numel() for b in skeleton.buffers())
    if wanted > max(held, BUFFER_ALLOWANCE):
        raise ModelError(f"{folder / 'config.json'} asks for buffers of {wanted:,} elements, more than its weights "
                         f"hold ({held:,}): the config does not describe these weights")


def _check_sizes(folder: Path, skeleton: nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
    """The weights hold at least the parameters the config describes (before any is allocated)."""
    held = sum(math.prod(s) for s in shapes.values())
    _check_buffers(folder, skeleton, held)
    wanted = sum(p.numel() for p in skeleton.parameters())
    if wanted <= held:
        return
    state = {name: tuple(t.shape) for name, t in skeleton.state_dict(keep_vars=True).items()}
    wrong = [f"{k} is {list(s)} in the config but {list(shapes[k])} in the weights"
             for k, s in state.items() if k in shapes and shapes[k] != s]
    missing = [k for k in state if k not in shapes]
    detail = wrong[0] if wrong else f"the weights lack {len(missing)} tensors: {', '.join(missing[:4])}" if missing else ""
    raise ModelError(f"{folder / 'config.json'} describes a model of {wanted:,} parameters but its weights hold "
                     f"{held:,}" + (f" ({detail})" if detail else ""))


def _check_loading(folder: Path, info: dict[str, Any]) -> None:
    """Every tensor of the model came from the weights and every tensor of the weights went into the model."""
    problems = [f"{len(keys)} {what} ({', '.join(sorted(map(str, keys))[:4])})"
                for what, keys in (("missing", info.get("missing_keys")), ("unexpected", info.get("unexpected_keys")),
                                   ("of the wrong shape", info.get("mismatched_keys"))) if keys]
    if problems:
        raise ModelError(f"the weights in {folder} do not match its config.json: tensors " + "; ".join(problems))


def load_model_folder(folder: str | os.PathLike, trust_pickle: bool = False) -> nn.Module:
    """The model a Hugging Face folder holds, in evaluation mode. The config is checked against the
    safetensors headers before the model is built, and every tensor must load (none missing or left over)."""
    folder = Path(folder)
    _config(folder)
    safe = sorted(folder.glob("*.safetensors"))
    pickled = sorted(folder.glob("pytorch_model*.bin"))
    if not safe and not pickled:
        raise ModelError(f"{folder} has a config.json but no weights (*.safetensors)")
    if not safe and not trust_pickle:
        raise ModelError(f"{folder} holds its weights pickled ({pickled[0].name}); unpickling runs code from the "
                         "file: pass --trust-pickle (trust_pickle=True) only for files you trust, or convert them "
                         "to safetensors")
    transformers = transformers_module("reading a Hugging Face model folder")
    config, cls = model_class(folder, transformers)
    if safe:
        shapes = _weight_shapes(safe, ModelError)
        _check_sizes(folder, _skeleton(folder, cls, config, list(shapes)), shapes)
    try:
        model, info = cls.from_pretrained(str(folder), config=config, local_files_only=True, trust_remote_code=False,
                                          use_safetensors=bool(safe), output_loading_info=True)
    except Exception as exc:
        raise ModelError(f"the weights in {folder} do not load into {cls.__name__} ({first_line(exc, 200)})") from None
    _check_loading(folder, info)
    return model.eval()


def load_tokenizer(folder: str | os.PathLike) -> Any:
    transformers = transformers_module("tokenizing text")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                               trust_remote_code=False)
    except Exception as exc:
        raise DataError(f"the model folder {folder} has no usable tokenizer to read text data with "
                        f"({first_line(exc, 160)})") from None
    if tokenizer.pad_token is None:  # LLaMA-style tokenizers: pad with end-of-sequence, masked out anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def read_texts(spec: str | os.PathLike) -> list[str]:
    """Examples from a text file (one per non-empty line) or a folder of ``.txt`` files."""
    path = Path(spec)
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise DataError(f"text data {path} is neither a text file nor a folder of .txt files")
    texts = []
    for f in files:
        try:
            texts += [line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise DataError(f"{f} is not UTF-8 text") from None
    if not texts:
        raise DataError(f"text data {path} holds no non-empty line")
    return texts


def tokenize(texts: list[str], tokenizer: Any, max_length: int) -> dict[str, torch.Tensor]:
    """Token ids and attention masks of ``texts``, padded to the longest (at most ``max_length``)."""
    try:
        enc = tokenizer(texts, max_length=max_length, truncation=True, padding="longest", return_tensors="pt")
    except Exception as exc:
        raise DataError(f"the text cannot be tokenized with the model's tokenizer ({first_line(exc, 160)})") from None
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if int(inputs["attention_mask"].sum()) == 0:
        raise DataError("the text data tokenizes to no tokens at all")
    return inputs


def position_limit(model: nn.Module) -> int | None:
    """How many tokens the model can read at once (``max_position_embeddings`` of its config), if it says."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return limit if type(limit) is int and limit > 0 else None


def text_data(spec: str, folder: str | os.PathLike, max_length: int | None, seed: int = 0, holdout: float = 0.1,
              limit: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Training and held-out keyword inputs from ``--data`` text, tokenized with the folder's tokenizer.

    A tenth of the examples (at least one, when there are ten or more) is held out, chosen
    by ``seed``, so fidelity can be measured on text the fine-tune never saw. ``max_length``
    may not exceed ``limit``, the model's positions (:func:`position_limit`); None takes
    :data:`TEXT_MAX_LENGTH` or the limit, whichever is less.
    """
    if max_length is None:  # the default: as many tokens as the model reads, up to TEXT_MAX_LENGTH
        max_length = min(TEXT_MAX_LENGTH, limit or TEXT_MAX_LENGTH)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise DataError(f"--max-length must be an integer >= 2, got {max_length!r}")
    if limit is not None and max_length > limit:
        raise DataError(f"--max-length {max_length} is more than the model can read: it has {limit} positions "
                        f"(max_position_embeddings in its config.json); give --max-length {limit} or less")
    texts = read_texts(spec)
    tokenizer = load_tokenizer(folder)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = int(len(texts) * holdout) if len(texts) >= 10 else 0
    test = [texts[i] for i in order[:n_test]]
    train = [texts[i] for i in order[n_test:]]
    return tokenize(train, tokenizer, max_length), (tokenize(test, tokenizer, max_length) if test else None)


def folder_copies(folder: str | os.PathLike) -> list[Path]:
    """The files of a model folder a compressed folder carries over: its config and the tokenizer
    files of :data:`TOKENIZER_FILES` it has, each checked to be the folder's own (:func:`own_file`)."""
    folder = Path(folder)
    names = ["config.json"] + [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    return [own_file(folder, name) for name in names]


def own_file(folder: str | os.PathLike, name: str) -> Path:
    """``folder / name``, refused when it is a link that resolves outside the folder.

    A compressed folder is made to be published; a ``vocab.txt`` linked to ``~/.ssh/id_rsa``
    would be copied into it content and all. A Hugging Face cache snapshot
    (``models--org--name/snapshots/REV/``) links every file to its entry's ``blobs/``, which
    belongs to the same model and is allowed.
    """
    folder, path = Path(folder), Path(folder) / name
    home = folder.resolve()
    roots = [home] + ([home.parent.parent / "blobs"] if home.parent.name == "snapshots" else [])
    target = path.resolve()
    if not any(target.is_relative_to(root) for root in roots):
        raise ModelError(f"{name} in {folder} is a link to {target}, outside the model folder; compressor copies "
                         "only the folder's own files into the output: replace the link by a copy of the file if "
                         "it belongs to the model")
    return path


def slim_checkpoint_in(folder: str | os.PathLike) -> Path:
    """The slim checkpoint of a compressed model folder (one error line if it is not one)."""
    path = Path(folder) / SLIM_CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"{folder} is a folder without {SLIM_CHECKPOINT}: not a compressed model folder")
    return path


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the ``meta`` device (sized, no memory) and their
    buffers for real: rotary frequencies or position ids are computed when built and saved nowhere
    (what accelerate's ``init_empty_weights(include_buffers=False)`` does)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def load_slim_folder(folder: str | os.PathLike, form: str = "cores", serve_shapes: Any = None) -> nn.Module:
    """A compressed model folder as a working model, rebuilt from its config alone, its factorized
    layers in ``form`` (see :func:`compressor.checkpoint.load`; a folder's model takes token ids).

    Every tensor of the compressed model is in the checkpoint, so no pretrained base is
    needed: the architecture comes from ``config.json``. It is first built on the ``meta``
    device and checked against the checkpoint's header (a config that lies about a size is
    one error, not an allocation), then built with parameters that only the checkpoint fills.
    """
    form = check_form(form)
    folder = Path(folder)
    ckpt = slim_checkpoint_in(folder)
    _config(folder)
    checkpoint.read_metadata(ckpt)  # the file itself is sound
    config, cls = model_class(folder, transformers_module("loading a compressed model folder"))
    _, shapes = read_safetensors_header(ckpt, CheckpointError, "checkpoint")
    skeleton = _skeleton(folder, cls, config, list(shapes))
    _check_buffers(folder, skeleton, sum(math.prod(s) for s in shapes.values()))
    try:
        checkpoint.check_fits(ckpt, skeleton)
    except CheckpointError as exc:
        raise CheckpointError(f"{folder / 'config.json'} does not describe the model in {SLIM_CHECKPOINT}: {exc}") from None
    try:
        with _parameters_on_meta():
            base = cls(config)
    except Exception as exc:
        raise ModelError(f"transformers cannot build the model in {folder} ({first_line(exc, 200)})") from None
    return checkpoint.load(ckpt, base=base, form=form, serve_shapes=serve_shapes).eval()


def load(path: str | os.PathLike, base: Any = None, trust_pickle: bool = False, *, form: str = "cores",
         serve_shapes: Any = None, example: Any = None) -> nn.Module:
    """A compressed model: a folder written by ``compress`` (rebuilt from its config), or a slim
    checkpoint rebuilt on ``base`` (a model, a factory, or a ``.pt2`` path).

    ``form``: how its factorized layers are served: ``"cores"`` (the default: the model the file
    holds, exact, trainable, savable again), ``"factors"``, ``"dense"``, or ``"auto"``, each layer's
    fastest at ``serve_shapes`` (input shapes; default a decode step and an 8 x 128 prefill for
    token ids, else batch 1 and 256 of ``example``) that keeps the model within its size target.
    """
    form = check_form(form)
    if Path(path).is_dir():
        return load_slim_folder(path, form, serve_shapes)
    if base is None:
        raise CheckpointError("a slim checkpoint file needs base= (the original model, a factory or a .pt2 path); "
                              "only a compressed model folder rebuilds from its config alone")
    return checkpoint.load(path, base=base, trust_pickle=trust_pickle, form=form, serve_shapes=serve_shapes,
                           example=example)


@torch.no_grad()
def perplexity(model: nn.Module, inputs: dict[str, torch.Tensor], batch_size: int = 16) -> float:
    """exp(mean negative log-likelihood of each next real token) of a causal LM on ``inputs``.

    The shift and the padding mask are the training loss's own (``losses.label_loss``), so
    the figure is what fine-tuning with these labels would minimise.
    """
    nll, count = 0.0, 0
    for batch in TensorLoader(inputs, None, batch_size):
        ran = forward(model, {**batch, "labels": batch["input_ids"]})
        tokens = count_correct(ran)[1]
        nll += float(label_loss(ran)) * tokens
        count += tokens
    if count == 0:
        raise DataError("the text has no token to predict (every example is one token long)")
    return float(torch.exp(torch.tensor(nll / count)))


@torch.no_grad()
def mean_cosine(model: nn.Module, reference: nn.Module, inputs: dict[str, torch.Tensor], batch_size: int = 16) -> float:
    """Mean cosine between two models' mean-pooled last hidden states (sentence embeddings)."""
    total, n = 0.0, 0
    for batch in TensorLoader(inputs, None, batch_size):
        mask = batch["attention_mask"][..., None].float()
        a, b = (m(**batch, output_hidden_states=True).hidden_states[-1] for m in (model, reference))
        pooled = [(h * mask).sum(1) / mask.sum(1).clamp(min=1) for h in (a, b)]
        total += float(torch.nn.functional.cosine_similarity(*pooled, dim=-1).sum())
        n += a.shape[0]
    return total / n


def _figure(value: float, digits: int) -> str:
    """A measured figure, or what a NaN or an infinity says: the model's outputs are not finite."""
    return f"{value:.{digits}f}" if math.isfinite(value) else "not finite (the model's outputs hold NaN/Inf)"


def folder_fidelity(folder: str | os.PathLike, text: str, base: str | os.PathLike | None, max_length: int,
                    batch_size: int, trust_pickle: bool = False,
                    slim: nn.Module | None = None) -> tuple[int, list[tuple[str, str]]]:
    """(examples, metric rows) of a compressed folder on ``text``: perplexity for a causal LM,
    and against the original folder (``base``) its perplexity or the embeddings' cosine.
    ``slim``: the folder's model already loaded (in the form to measure), else loaded in cores."""
    slim = load_slim_folder(folder) if slim is None else slim
    max_length = min(max_length, position_limit(slim) or max_length)  # the default, not the user's: fit it
    inputs = tokenize(read_texts(text), load_tokenizer(folder), max_length)
    original = load_model_folder(base, trust_pickle) if base is not None else None
    rows = []
    if predicts_next_token(slim):
        rows.append(("perplexity (compressed)", _figure(perplexity(slim, inputs, batch_size), 3)))
        if original is not None:
            rows.append(("perplexity (original)", _figure(perplexity(original, inputs, batch_size), 3)))
    if original is not None:
        rows.append(("mean cosine of sentence embeddings with original",
                     _figure(mean_cosine(slim, original, inputs, batch_size), 4)))
    if not rows:
        raise ModelError("nothing to measure: give --base ORIGINAL_FOLDER to compare a model that is not a causal LM")
    return inputs["input_ids"].shape[0], rows
