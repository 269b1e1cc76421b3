"""What a user deploys: file bytes, held-out perplexity, decode and prefill speed, peak memory.

SmolLM2-135M as dense fp32 (the Hugging Face model as loaded), dense int8 and dense int4
(torchao weight-only, the same quantizer family for both), and slim models made by
``compress`` at 1.25x, 1.5x, 2x and 2.6x, each in fp32 and in int8 when ``compress`` can store int8
(``quantize`` in ``CompressConfig``); a slim model is served in every form ``compressor.load``
offers (``form=`` when it takes one, else the cores as saved). Per model:

* ``file_bytes``: the file a user ships. Dense fp32: the folder's ``model.safetensors``.
  Dense int8/int4: a safetensors file written here from the quantized state, each torchao
  tensor stored as its inner tensors (int8 values, scales, zero points); int4 values are
  packed two to a byte (torchao holds them unpacked in int8 in memory on a CPU). Slim: the
  ``compressor.save`` file;
* ``perplexity`` on the first 256 examples of the held-out plays at max length 128, as
  ``llm.py`` measures it (``hf_folders.perplexity``, batches of 16);
* ``decode_tokens_per_s``: batch 1, greedy ``generate()`` from a fixed 32-token prompt, exactly
  64 new tokens (``min_new_tokens = max_new_tokens``), with the KV cache; 64 over the seconds of
  the whole call (the prompt's prefill included);
* ``prefill_s``: one forward of 8 x 128 real tokens without a cache;
* ``peak_rss_bytes``: each model alone in a fresh subprocess, the resident set sampled every
  millisecond while it decodes and prefills once (after loading, with freed memory handed back
  to the OS); ``load_peak_rss_bytes`` is that process's lifetime high-water mark (ru_maxrss,
  loading included) and ``baseline_rss_bytes`` its size after the imports, before any model.

Timings: every model is loaded in one process and measured in alternation (decode, prefill,
next model), medians over ``--repeats``; ``speedup_vs_dense`` is against dense fp32 in the
same run. The slim models are made once, on the training plays with a short fixed budget,
and cached under ``benchmarks/data/deploy/`` with how they were made.

LeNet-5 (``lenet5`` in the JSON): batch 1 and 256 latency of a slim 20x TR model against the
dense one, ``cost.py``'s measurement and slim run.

    nice -n 10 python benchmarks/deploy.py            # -> results/deploy.json, .png, docs table
    python benchmarks/deploy.py --quick --out /tmp/d.json   # a tiny random Llama: the plumbing
    python benchmarks/deploy.py --report              # table and PNG from the JSON only
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import gc
import inspect
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import compressor  # noqa: E402
from compressor import CompressConfig, compress  # noqa: E402
from compressor.data import TensorLoader  # noqa: E402
from compressor.hf_folders import (_parameters_on_meta, load_model_folder, load_tokenizer, perplexity,  # noqa: E402
                                   read_texts, tokenize)

from provenance import code_version  # noqa: E402
from render import update_documents  # noqa: E402
from rows import DEFAULT_ROW  # noqa: E402

FOLDER = HERE / "data" / "smollm2"
TEXT = HERE / "data" / "shakespeare"
CACHE = HERE / "data" / "deploy"
DEFAULT_OUT = HERE / "results" / "deploy.json"
#: 2.6x besides the issue's three: the int8 file of a 2x model is 7.95x smaller than fp32, just
#: outside the 8x budget, so without it no ours+int8 model would stand at 8x, 9x or 10x.
TARGETS = ("1.25x", "1.5x", "2x", "2.6x")
#: Distillation tokens per slim model: 75 steps of 8 examples, about 40 minutes a model on one
#: core. The first deploy runs used 16,000 (19 steps), which left the slim models at 1.8-2.4x
#: dense perplexity: too short a run to say what the method gives (``llm.py``'s 117 steps reach
#: 1.03-1.3x), and not what a user with a size budget would ship.
DEFAULT_TOKENS = 64_000
#: Group size of the dense int4 weights (one fp32 scale and one zero point per group).
INT4_GROUP = 32
PROMPT_TOKENS, PREFILL = 32, (8, 128)
#: The goals of issue #28: decode and prefill of the 1.5x slim model in its auto form against
#: dense fp32, and the byte budgets (times smaller than fp32) where ours+int8 must sit on or
#: below the dense int8-int4 line.
SPEED_GOAL, GOAL_TARGET, BUDGETS = 1.2, 1.5, tuple(range(4, 11))


# ------------------------------------------------------------------ what the library offers today
def load_forms() -> tuple[str, ...]:
    """The forms a slim model is measured in: ``compressor.load``'s ``form=`` choices when it takes
    one (``auto`` first, the goal's form), else the cores as saved."""
    param = inspect.signature(compressor.load).parameters.get("form")
    if param is None:
        return ("cores",)
    return ("auto", "cores")


def load_slim(path: Path, base: Callable[[], nn.Module], form: str, example: Any = None) -> tuple[nn.Module, Any]:
    """A slim checkpoint as a user loads it, in ``form``, with the choice of forms ``auto`` made
    (``compressor.checkpoint.load_served``; None in cores). ``example``: an input ``auto`` times the
    layers at, for a model that does not take token ids."""
    from compressor.checkpoint import load_served

    model, choice = load_served(path, base=base, form=form, example=example if form == "auto" else None)
    return model.eval(), choice


def choice_by_kind(choice: Any) -> dict[str, Any] | None:
    """``auto``'s choice per layer kind (a layer's last name: ``q_proj``, ``conv2``): how many took
    each form, and the median measured speed-up of the chosen form over the cores and over dense
    per served shape; then the whole-model check (cores' time / the picked forms', per shape)."""
    if choice is None or choice.asked != "auto":
        return None
    kinds: dict[str, list[Any]] = {}
    for layer in choice.layers:
        kinds.setdefault(layer.name.rpartition(".")[2], []).append(layer)
    per_shape = lambda ls, versus: [statistics.median(v) for v in zip(*(l.speedup(versus) for l in ls))]  # noqa: E731
    return {"shapes": [list(s) for s in choice.shapes], "in_model_speedup_vs_cores": list(choice.in_model),
            "kept_cores": choice.kept_cores,
            "kinds": {kind: {"layers": len(ls), "forms": dict(Counter(l.form for l in ls)),
                             "speedup_vs_cores": per_shape(ls, "cores"), "speedup_vs_dense": per_shape(ls, "dense")}
                      for kind, ls in sorted(kinds.items())}}


def slim_quantizers() -> tuple[str, ...]:
    """``none``, and ``int8`` when ``compress`` can store int8 (a ``quantize`` field in its config)."""
    return ("none", "int8") if "quantize" in {f.name for f in dataclasses.fields(CompressConfig)} else ("none",)


# ------------------------------------------------------------------ dense int8 / int4 (torchao)
def int4_weight_only_attempts() -> dict[str, str]:
    """torchao's ``Int4WeightOnlyConfig`` in each packing format on a small fp32 and bf16 Linear:
    ``ok`` or why it does not run on this machine."""
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    out = {}
    for fmt in ("plain", "preshuffled", "plain_int32", "tile_packed_to_4d"):
        for dtype in (torch.float32, torch.bfloat16):
            m = nn.Linear(256, 64).to(dtype)
            try:
                quantize_(m, Int4WeightOnlyConfig(group_size=INT4_GROUP, int4_packing_format=fmt))
                with torch.no_grad():
                    m(torch.randn(2, 256, dtype=dtype))
                out[f"{fmt}/{str(dtype)[6:]}"] = "ok"
            except Exception as exc:  # noqa: BLE001 -- the reason is the record
                out[f"{fmt}/{str(dtype)[6:]}"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"
    return out


def dense_quantizer(quantize: str) -> tuple[Any, Any, str]:
    """(torchao config for the Linear layers, for an untied embedding, what the record calls it)."""
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    if quantize == "int8":
        return (Int8WeightOnlyConfig(), IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)),
                "torchao Int8WeightOnlyConfig (per-row symmetric int8; embedding: the tied head's)")
    group = PerGroup(INT4_GROUP)
    return (IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=group),
            IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=group),
            f"torchao IntxWeightOnlyConfig(int4, group {INT4_GROUP}) (Int4WeightOnlyConfig does not run on this CPU; "
            "embedding: the tied head's)")


def quantized_dense(dense: nn.Module, quantize: str) -> nn.Module:
    """A copy of ``dense`` with every Linear (and the embedding) weight-only quantized; an
    embedding tied to the head reads the head's quantized weight, so it is stored once."""
    from torchao.quantization import quantize_

    linear, embedding, _ = dense_quantizer(quantize)
    m = copy.deepcopy(dense)
    tied = [(e, h) for e in m.modules() if isinstance(e, nn.Embedding)
            for h in m.modules() if isinstance(h, nn.Linear) and h.weight is e.weight]
    quantize_(m, linear)
    for e, h in tied:
        e.weight = h.weight
    done = {id(e) for e, _ in tied}
    quantize_(m, embedding, filter_fn=lambda mod, fqn: isinstance(mod, nn.Embedding) and id(mod) not in done)
    return m.eval()


def quantized_file_bytes(model: nn.Module, pack_int4: bool) -> int:
    """Bytes of a safetensors file holding ``model``'s state once per tensor: a torchao tensor as
    its inner tensors, int4 values packed two to a byte when ``pack_int4``. Written and measured."""
    from safetensors.torch import save_file

    tensors, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
            for attr in t.__tensor_flatten__()[0]:
                inner = getattr(t, attr).detach()
                if attr == "qdata" and pack_int4:
                    inner = _pack_nibbles(inner)
                tensors[f"{name}.{attr}"] = inner.contiguous().clone()
        else:
            tensors[name] = t.detach().contiguous().clone()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "q.safetensors"
        save_file(tensors, str(path))
        return path.stat().st_size


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    flat = (q.reshape(-1).to(torch.int16) & 0xF).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


# ------------------------------------------------------------------ the model, its text, its inputs
@dataclasses.dataclass
class Setup:
    """What every measurement of one model family reads, the same in the parent and each subprocess."""

    name: str
    key: str  # the cache files' prefix
    dense: Callable[[], nn.Module]  # a fresh dense model, as loaded
    skeleton: Callable[[], nn.Module]  # the architecture with its parameters on ``meta``: a slim load's base
    train: Callable[[], dict[str, torch.Tensor]]  # the fine-tuning text, tokenized (only when a slim model is made)
    test: dict[str, torch.Tensor]
    prompt: dict[str, torch.Tensor]  # batch 1, PROMPT_TOKENS tokens
    prefill: dict[str, torch.Tensor]  # PREFILL real tokens
    pad_id: int
    dense_file_bytes: int
    max_length: int


def _inputs(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def smollm2_setup(held_out: int, max_length: int = 128) -> Setup:
    """SmolLM2-135M and the Shakespeare split, as ``llm.py`` reads them; the prompt and the prefill
    batch are the first tokens of the held-out plays run together."""
    from compressor.hf_folders import model_class, transformers_module

    tokenizer = load_tokenizer(FOLDER)
    texts = read_texts(TEXT / "test.txt")
    stream = tokenizer("\n".join(texts[:2000]), return_tensors="pt")["input_ids"][0]
    rows, length = PREFILL
    config, cls = model_class(FOLDER, transformers_module("reading SmolLM2"))

    def skeleton() -> nn.Module:
        with _parameters_on_meta():
            return cls(config)
    return Setup("SmolLM2-135M", "smollm2", lambda: load_model_folder(FOLDER), skeleton,
                 lambda: tokenize(read_texts(TEXT / "train.txt"), tokenizer, max_length),
                 tokenize(texts[:held_out], tokenizer, max_length), _inputs(stream[:PROMPT_TOKENS][None]),
                 _inputs(stream[PROMPT_TOKENS:PROMPT_TOKENS + rows * length].view(rows, length)),
                 tokenizer.pad_token_id, (FOLDER / "model.safetensors").stat().st_size, max_length)


def tiny_setup() -> Setup:
    """``--quick``: a random two-layer Llama (vocabulary 512, width 64) on random token ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)

    def dense() -> nn.Module:
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()

    def skeleton() -> nn.Module:
        with _parameters_on_meta():
            return LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(0)
    ids = lambda n, length: _inputs(torch.randint(0, 512, (n, length), generator=g))  # noqa: E731
    train, test, prompt, prefill = ids(64, 32), ids(16, 32), ids(1, PROMPT_TOKENS), ids(PREFILL[0], 32)
    return Setup("tiny random Llama (--quick)", "tiny", dense, skeleton, lambda: train, test, prompt, prefill, 0,
                 quantized_file_bytes(dense(), False), 32)


def make_setup(quick: bool, held_out: int) -> Setup:
    return tiny_setup() if quick else smollm2_setup(held_out)


# ------------------------------------------------------------------ slim models, made once and cached
def slim_path(setup: Setup, cache: Path, target: str, quantize: str, args) -> Path:
    return cache / f"{setup.key}_{target}_{quantize}_{tokens_for(args, target)}tok_seed{args.seed}.safetensors"


def tokens_for(args, target: str) -> int:
    """The distillation tokens the model at ``target`` is made with: ``--tokens``, or ``--tokens-at``'s."""
    return args.tokens_at.get(target, args.tokens)


def make_slim(setup: Setup, cache: Path, target: str, quantize: str, args) -> dict[str, Any]:
    """How the slim model at ``target`` was made (its checkpoint made now unless cached): the tool's
    default run (``llm.py``'s ``default`` row) at :func:`tokens_for` tokens of distillation."""
    from llm import _progress, compress_options

    path = slim_path(setup, cache, target, quantize, args)
    sidecar = path.with_suffix(".json")
    if path.is_file() and sidecar.is_file():
        return json.loads(sidecar.read_text())
    if quantize != "none":
        return quantized_slim(setup, cache, target, quantize, args)
    train = setup.train()
    per_example = float(train["attention_mask"].sum()) / train["attention_mask"].shape[0]
    budget = tokens_for(args, target)
    steps = max(1, round(budget / (args.batch_size * per_example)))
    row = SimpleNamespace(seed=args.seed, lr=args.lr, calibration_batches=args.calibration_batches, log_every=10,
                          distill_hidden=0.0, gate_fraction=None, gate_lr=None, skip=())
    options = compress_options(DEFAULT_ROW, steps, row)
    loader = TensorLoader(train, None, args.batch_size, shuffle=True, seed=args.seed)
    t0, code = time.perf_counter(), code_version()  # the code that trains, not whatever is checked out at the end
    result = compress(setup.dense(), loader, "tt", target, callback=_progress("default", quantize, target), **options)
    cache.mkdir(parents=True, exist_ok=True)
    compressor.save(result, path)
    r = result.report
    made = {"file": path.name, "row": "default", "decomp": "tt", "target": target, "quantize": quantize,
            "steps": r.steps, "tokens": sum(r.tokens_per_rank), "budget_tokens": budget, "seed": args.seed,
            "lr": args.lr, "batch_size": args.batch_size, "max_length": setup.max_length,
            "calibration_batches": args.calibration_batches, "ratio": r.ratio, "params": r.params,
            "seconds": time.perf_counter() - t0, "chosen": r.chosen, "code": code}
    sidecar.write_text(json.dumps(made, indent=1))
    return made


def quantized_slim(setup: Setup, cache: Path, target: str, quantize: str, args) -> dict[str, Any]:
    """The slim model at ``target`` (fp32, made or cached) stored as ``quantize``: the same trained
    weights in int8, as ``compress(..., quantize="int8")`` stores them after pruning. A run asked
    for int8 counts its target in bytes (``1.25x`` would be met by int8 alone), so the int8 rows
    quantize the fp32 rows' models: same ranks, same training, a quarter of the bytes."""
    from compressor.checkpoint import read_blueprint
    from compressor.quantize import quantize_model

    source = slim_path(setup, cache, target, "none", args)
    made = make_slim(setup, cache, target, "none", args)
    model = compressor.load(source, base=setup.skeleton)
    quantization = quantize_model(model, quantize)
    quantization.load_into(model)
    path = slim_path(setup, cache, target, quantize, args)
    compressor.save(model, path, blueprint=read_blueprint(source), quantization=quantization)
    made = {**made, "file": path.name, "quantize": quantize, "quantized_from": source.name,
            "quantized_by": code_version()}  # the quantizer may be newer than the training
    path.with_suffix(".json").write_text(json.dumps(made, indent=1))
    return made


# ------------------------------------------------------------------ the models measured
@dataclasses.dataclass
class Entry:
    spec: dict[str, Any]  # what a subprocess needs to build the same model (see ``build``)
    record: dict[str, Any]
    model: nn.Module | None = None


def build(spec: dict[str, Any], setup: Setup) -> tuple[nn.Module, Any]:
    """The model ``spec`` names: dense (quantized or not) or a slim checkpoint in a form, and the
    choice of forms made for it (None but for ``auto``)."""
    if spec["model"] == "dense":
        dense = setup.dense()
        return (dense if spec["quantize"] == "none" else quantized_dense(dense, spec["quantize"])), None
    return load_slim(Path(spec["path"]), setup.skeleton, spec["form"])


def layer_classes(model: nn.Module) -> dict[str, int]:
    """How many modules of each class hold weights of their own (a parameter list counted as the
    module it belongs to, as a layer's cores are): the form a model is served in."""
    modules = dict(model.named_modules())
    owners = {name.rpartition(".")[0] if isinstance(m, (nn.ParameterList, nn.ParameterDict)) else name
              for name, m in modules.items() if any(True for _ in m.parameters(recurse=False))}
    return dict(sorted(Counter(type(modules[name]).__name__ for name in owners).items()))


def entries(setup: Setup, cache: Path, args, made: dict[str, dict[str, Any]]) -> list[Entry]:
    """Dense fp32, int8, int4, then every slim model made, in every quantization and form."""
    out = [Entry({"model": "dense", "quantize": "none"},
                 {"model": "dense", "target": 1.0, "quantize": "none", "form": "dense",
                  "how": "the Hugging Face model as loaded (float32)", "file_bytes": setup.dense_file_bytes})]
    for quantize in ("int8", "int4"):
        out.append(Entry({"model": "dense", "quantize": quantize},
                         {"model": "dense", "target": 1.0, "quantize": quantize, "form": "torchao",
                          "how": dense_quantizer(quantize)[2]}))
    for key, m in made.items():
        # int8 changes the file, not the served model's arithmetic: its rows take the goal's form only
        for form in load_forms() if m["quantize"] == "none" else load_forms()[:1]:
            path = cache / m["file"]
            out.append(Entry({"model": "slim", "quantize": m["quantize"], "path": str(path), "form": form},
                             {"model": "slim", "target": float(m["target"].rstrip("x")), "quantize": m["quantize"],
                              "form": form, "how": key, "file_bytes": path.stat().st_size}))
    return out


# ------------------------------------------------------------------ measurements
def decode_fn(model: nn.Module, setup: Setup, new_tokens: int) -> Callable[[], None]:
    """One greedy ``generate()`` at batch 1 making exactly ``new_tokens`` tokens with the KV cache."""
    start = setup.prompt["input_ids"].shape[1]

    def run() -> None:
        with torch.no_grad():
            out = model.generate(**setup.prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=setup.pad_id)
        if out.shape[1] - start != new_tokens:
            raise RuntimeError(f"generate made {out.shape[1] - start} tokens, not {new_tokens}")
    return run


def prefill_fn(model: nn.Module, setup: Setup) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            model(**setup.prefill, use_cache=False)
    return run


def timings(items: list[Entry], setup: Setup, repeats: int, new_tokens: int) -> None:
    """Decode and prefill of every model, in alternation; medians into each record."""
    from cost import interleaved

    fns = {}
    for i, e in enumerate(items):
        fns[i, "decode"] = decode_fn(e.model, setup, new_tokens)
        fns[i, "prefill"] = prefill_fn(e.model, setup)
    t = interleaved(fns, repeats, 1, warmup=1)
    dense = items[0].record
    for i, e in enumerate(items):
        e.record.update(decode_tokens_per_s=new_tokens / t[i, "decode"], prefill_s=t[i, "prefill"])
    for e in items:
        r = e.record
        r["speedup_vs_dense"] = {"decode": r["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
                                 "prefill": dense["prefill_s"] / r["prefill_s"]}


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(spec: dict[str, Any], quick: bool, new_tokens: int) -> dict[str, int]:
    """In a fresh process: the model ``spec`` names, built alone, decoding and prefilling once while
    a thread samples the resident set every millisecond."""
    setup = make_setup(quick, held_out=1)
    baseline = rss()
    model = build(spec, setup)[0]
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # what loading freed goes back to the OS
    except OSError:
        pass
    loaded, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)
    sampler = threading.Thread(target=sample)
    sampler.start()
    decode_fn(model, setup, new_tokens)()
    prefill_fn(model, setup)()
    done.set()
    sampler.join()
    return {"peak_rss_bytes": max(peak[0], loaded), "loaded_rss_bytes": loaded, "baseline_rss_bytes": baseline,
            "load_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def peak_memory(spec: dict[str, Any], quick: bool, new_tokens: int) -> dict[str, int]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec), "--new-tokens", str(new_tokens)]
    out = subprocess.run(cmd + (["--quick"] if quick else []), capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the peak-memory subprocess failed for {spec}: {out.stderr.strip()[-800:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "platform": platform.platform()}


# ------------------------------------------------------------------ LeNet-5 (cost.py's measurement)
def lenet5_part(cache: Path, repeats: int) -> dict[str, Any]:
    """Batch 1 and 256 latency of a slim 20x TR LeNet-5 against the dense one, per form (``cost.py``'s
    inference measurement and slim run; the slim model is made once and cached)."""
    import cost
    from compressor.zoo import lenet5

    dense = cost.dense_model()
    path = cache / f"lenet5_{cost.SLIM_TARGET}_tr.safetensors"
    sidecar = path.with_suffix(".json")
    if not (path.is_file() and sidecar.is_file()):
        torch.manual_seed(0)
        result = compress(dense, cost.fashion_loader(cost.SLIM_IMAGES), "tr", cost.SLIM_TARGET, epochs=1)
        cache.mkdir(parents=True, exist_ok=True)
        compressor.save(result, path)
        sidecar.write_text(json.dumps({"images": cost.SLIM_IMAGES, "epochs": 1, "target": cost.SLIM_TARGET,
                                       "ratio": result.report.ratio, "code": code_version()}, indent=1))
    out: dict[str, Any] = {"slim": json.loads(sidecar.read_text()), "file_bytes": path.stat().st_size, "forms": {}}
    for form in load_forms():
        slim, choice = load_slim(path, lenet5, form, example=torch.zeros(1, 1, 28, 28))
        out["forms"][form] = {"inference": latencies(dense, slim, repeats), "layer_classes": layer_classes(slim)}
        if (chosen := choice_by_kind(choice)) is not None:
            out["forms"][form]["auto"] = chosen
    out["dense_direct_kernel"] = latencies(dense, dense_on_direct_kernel(dense), repeats)
    return out


def latencies(dense: nn.Module, other: nn.Module, repeats: int) -> dict[str, Any]:
    """``cost.measure_inference`` of ``other`` against ``dense``, each batch with its speed-up."""
    import cost

    infer = cost.measure_inference(dense, other, repeats)
    for v in infer.values():
        v["speedup_vs_dense"] = 1 / v["slim_vs_dense"]
    return infer


def dense_on_direct_kernel(dense: nn.Module) -> nn.Module:
    """The dense LeNet-5 with every conv a ``ServedConv2d`` (small calls on torch's direct kernel, as
    our served convs): the reference that says how much of the slim model's batch-1 speed is the
    kernel choice, which a dense model could make too, and how much the factorization."""
    from compressor.conv_kernel import ServedConv2d

    model = copy.deepcopy(dense)
    for module in model.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = ServedConv2d  # same attributes and state; only forward differs
    return model


# ------------------------------------------------------------------ the run, the JSON, the figure
def measure(setup: Setup, cache: Path, args) -> dict[str, Any]:
    """Every model of the run, loaded together; the slim ones made first if not cached."""
    made = {f"{t} {q}": make_slim(setup, cache, t, q, args) for t in args.targets for q in slim_quantizers()}
    items = entries(setup, cache, args, made)
    for e in items:
        e.model, choice = build(e.spec, setup)
        e.record["layer_classes"] = layer_classes(e.model)
        if (chosen := choice_by_kind(choice)) is not None:
            e.record["auto"] = chosen
        if e.record["model"] == "dense" and e.record["quantize"] != "none":
            e.record["file_bytes"] = quantized_file_bytes(e.model, e.record["quantize"] == "int4")
        e.record["perplexity"] = perplexity(e.model, setup.test, 16)
        print(f"{e.record['model']} {e.record['target']:g}x {e.record['quantize']} {e.record['form']}: perplexity "
              f"{e.record['perplexity']:.2f}, {e.record['file_bytes'] / 1e6:.1f} MB", flush=True)
    timings(items, setup, args.repeats, args.new_tokens)
    for e in items:
        e.model = None
        gc.collect()
        e.record.update(peak_memory(e.spec, args.quick, args.new_tokens))
        r = e.record
        print(f"{r['model']} {r['target']:g}x {r['quantize']} {r['form']}: {r['decode_tokens_per_s']:.1f} tokens/s, "
              f"prefill {r['prefill_s']:.3f} s, peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    return {"slim_made": made, "runs": [e.record for e in items]}


def not_available() -> list[dict[str, str]]:
    """What the issue asks for that this checkout or this machine cannot give, and why."""
    out = []
    if "int8" not in slim_quantizers():
        out.append({"what": "ours+int8", "why": "`compress` has no `quantize` option in this checkout"})
    if "auto" not in load_forms():
        out.append({"what": "ours in the `auto` and `factors` forms",
                    "why": "`compressor.load` takes no `form` in this checkout: the cores as saved"})
    return out


def plot(result: dict[str, Any], png: Path) -> None:
    """Perplexity against file bytes (both log), the dense int8-int4 line drawn across the budgets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    from tables import deploy_line

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in result["runs"]:  # one point per file: a model's forms share its bytes and perplexity
        bits = "fp32" if r["quantize"] == "none" else r["quantize"]
        name = f"dense {bits}" if r["model"] == "dense" else f"ours {bits}"
        if all(p["file_bytes"] != r["file_bytes"] for p in groups.get(name, [])):
            groups.setdefault(name, []).append(r)
    for i, (name, runs) in enumerate(sorted(groups.items())):
        runs.sort(key=lambda r: r["file_bytes"])
        ax.plot([r["file_bytes"] for r in runs], [r["perplexity"] for r in runs], "s" if "dense" in name else "o-",
                label=name, color=f"C{i}")
        for r in runs:
            if r["model"] == "slim":
                ax.annotate(f"{r['target']:g}×", (r["file_bytes"], r["perplexity"]), fontsize=7,
                            textcoords="offset points", xytext=(4, 4))
    fp32 = next(r for r in result["runs"] if r["model"] == "dense" and r["quantize"] == "none")["file_bytes"]
    line = deploy_line(result)
    if line is not None:
        xs = [fp32 / k for k in (3.5, 12)]
        ax.plot(xs, [line(x) for x in xs], "k--", lw=0.8, label="line through dense int8 and int4")
    ax.axvspan(fp32 / 10, fp32 / 4, color="0.9", zorder=0, label="budgets 4×-10× smaller than fp32")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("file bytes")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"{result['model_name']}: perplexity against file size")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def finish(result: dict[str, Any], out: Path) -> None:
    """The table and the PNG from ``result``; the documents too when it is the published JSON."""
    from tables import deploy_table

    plot(result, out.with_suffix(".png"))
    print(deploy_table(result))
    print("wrote", out, out.with_suffix(".png"))
    if out.resolve() == DEFAULT_OUT.resolve():
        for doc in update_documents({"deploy"}):
            print("rendered", doc)


def arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a tiny random Llama, few examples, no LeNet-5: the plumbing")
    ap.add_argument("--targets", default=None, help=f"comma list (default {','.join(TARGETS)}; quick: 1.5x)")
    ap.add_argument("--tokens", type=int, default=None, help=f"distillation tokens per slim model (default {DEFAULT_TOKENS}; "
                                                             "quick: 500)")
    ap.add_argument("--tokens-at", action="append", default=[], metavar="TARGET=TOKENS",
                    help="another budget for one target (repeatable), e.g. 1.25x=16000: a model cached from an "
                         "earlier, shorter run; the table says which target had which")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=5e-5, help="as llm.py")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--calibration-batches", type=int, default=None, help="default 8; quick: 2")
    ap.add_argument("--held-out", type=int, default=None, help="test examples (default 256, as llm.py; quick: 16)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved timing repeats (default 5; quick: 2)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens each decode makes (default 64; quick: 8)")
    ap.add_argument("--no-lenet5", action="store_true", help="skip the LeNet-5 latencies (quick skips them)")
    ap.add_argument("--make-only", action="store_true", help="only make (and cache) the slim models")
    ap.add_argument("--cache", default=None, help=f"where slim models are kept (default {CACHE}; quick: a temp dir)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one model's peak memory, in a subprocess
    ap.add_argument("--out", default=None, help=f"JSON path (default {DEFAULT_OUT}; quick: results/deploy_quick.json)")
    ap.add_argument("--report", action="store_true", help="only redraw the table and PNG from the JSON")
    args = ap.parse_args()
    q = args.quick
    args.targets = (args.targets or ("1.5x" if q else ",".join(TARGETS))).split(",")
    args.tokens = args.tokens if args.tokens is not None else (500 if q else DEFAULT_TOKENS)
    try:
        args.tokens_at = {t: int(n) for t, n in (item.split("=", 1) for item in args.tokens_at)}
    except ValueError:
        ap.error("--tokens-at takes TARGET=TOKENS, e.g. 1.25x=16000")
    args.calibration_batches = args.calibration_batches or (2 if q else 8)
    args.held_out = args.held_out or (16 if q else 256)
    args.repeats = args.repeats or (1 if q else 5)
    args.new_tokens = args.new_tokens or (8 if q else 64)
    args.out = Path(args.out) if args.out else DEFAULT_OUT.with_name("deploy_quick.json") if q else DEFAULT_OUT
    return args


def main() -> None:
    args = arguments()
    if args.child is not None:
        return print(json.dumps(child(json.loads(args.child), args.quick, args.new_tokens)))
    if args.report:
        return finish(json.loads(args.out.read_text()), args.out)
    if not args.quick and not (FOLDER.is_dir() and (TEXT / "train.txt").is_file()):
        sys.exit("error: run `python benchmarks/prepare_smollm2.py` first (it makes benchmarks/data/)")
    code = code_version()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache) if args.cache else Path(tmp) if args.quick else CACHE
        setup = make_setup(args.quick, args.held_out)
        if args.make_only:
            for t in args.targets:
                for q in slim_quantizers():
                    print(make_slim(setup, cache, t, q, args))
            return
        result = {"what": f"{setup.name}, dense and slim as deployed", "model_name": setup.name,
                  "command": " ".join(["python"] + sys.argv), "code": code, "machine": machine(),
                  "held_out": args.held_out, "max_length": setup.max_length, "new_tokens": args.new_tokens,
                  "prompt_tokens": PROMPT_TOKENS, "prefill": list(setup.prefill["input_ids"].shape),
                  "repeats": args.repeats, "budgets": list(BUDGETS), "speed_goal": SPEED_GOAL,
                  "quantizers": {"dense int8": dense_quantizer("int8")[2], "dense int4": dense_quantizer("int4")[2],
                                 "torchao Int4WeightOnlyConfig on this CPU": int4_weight_only_attempts()},
                  "not_available": not_available(), "forms": list(load_forms()), "slim_quantize": list(slim_quantizers()),
                  **measure(setup, cache, args)}
    from tables import deploy_frontier

    result["frontier"] = deploy_frontier(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))  # the language model's half is kept whatever follows
    if not (args.quick or args.no_lenet5):
        result["lenet5"] = lenet5_part(Path(args.cache) if args.cache else CACHE, args.repeats * 5)
        args.out.write_text(json.dumps(result, indent=1))
    finish(result, args.out)


if __name__ == "__main__":
    main()
