"""How fast a factorized layer computes, beside the same layer as two matrices and dense (issue #28).

Every layer is timed four ways in one process, interleaved (medians of many alternating
repeats, so the *ratios* survive a busy machine):

* ``dense``: the original ``nn.Linear`` / ``nn.Conv2d`` / ``nn.Embedding``;
* ``factors``: the same weight served as two standard modules, made by contracting the cores
  at the split between input and output cores: ``nn.Linear(in, r, bias=False) ->
  nn.Linear(r, out)`` with ``r = r_0 * r_split`` for a ring (a conv: a k x k conv to r channels,
  then a 1 x 1 conv; an embedding: an (V, r) table, then a Linear);
* ``cores``: the layer as this checkout computes it;
* ``cores_before``: the same layer (same cores) as the code of ``--before`` computes it (the
  package at that git ref, extracted under another name and imported beside this one).

Layers: SmolLM2-135M-like (Llama) linears 576->576, 576->1536, 1536->576 and the tied
49152 x 576 embedding (its lookup, and the head computing from it), as tensor rings at about
1.5x. Linears in two layouts: ``whitened`` (the whole input in one core, as ``--init
activations`` starts every Llama linear) and ``balanced`` (the planner's own split of both
sides); the embedding as ``compress`` starts a tied one (vocabulary and dimension one core
each: a balanced split at 1.5x needs bonds of ~700 and its lookup gathers r^2 per core and
token); and
LeNet-5's conv2 and fc1 at about 20x, plus the whole LeNet-5 with those layers. Batches: one
token and 8 x 128 tokens (LeNet: 1 and 256 images). With ``--llama``, a tiny Llama (hidden
256, 4 layers) greedy-decodes with ``generate()``: dense, cores and cores_before tokens/s.

    python benchmarks/layer_speed.py [--before main] [--threads 1 2] [--repeats 25] [--llama] [--out PATH]
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import math
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from compressor import tensornet as tn  # noqa: E402
from compressor.layers import TNConv2d, TNEmbedding, TNLinear, TiedTNLinear  # noqa: E402
from compressor.zoo import lenet5  # noqa: E402
from provenance import code_version  # noqa: E402

DEFAULT_OUT = HERE / "results" / "layer_speed.json"
LLAMA_LINEARS = ((576, 576), (576, 1536), (1536, 576))


# --------------------------------------------------------------------------- the code before
def package_at(ref: str):
    """The ``compressor`` package as it was at git ``ref``, imported as ``compressor_before``
    (its imports are relative, so a renamed copy is a second, independent package)."""
    blob = subprocess.run(["git", "-C", str(HERE.parent), "archive", ref, "compressor"], capture_output=True,
                          check=True).stdout
    root = Path(tempfile.mkdtemp(prefix="compressor_before_"))
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(root, filter="data")
    (root / "compressor").rename(root / "compressor_before")
    sys.path.insert(0, str(root))
    return importlib.import_module("compressor_before.layers")


def twin(layer: nn.Module, old) -> nn.Module:
    """``layer`` rebuilt by the old package from its spec, holding the same tensors."""
    built = old.TNLayer.from_spec(layer.spec()).eval()
    built.load_state_dict(layer.state_dict())
    return built


# --------------------------------------------------------------------------- building layers
def ring_ranks(modes: tuple[int, ...], dense: int, ratio: float, closing: int) -> list[int]:
    """Bond sizes of a ring over ``modes``: the closing bond ``closing``, the inner bonds one size
    (each capped by what its unfolding can hold), the largest with ``ratio`` x fewer parameters."""
    best = None
    for r in range(1, 4096):
        ranks = tn.resolve_ranks([r] * (len(modes) - 1) + [closing], modes, "tr")
        if tn.param_count(modes, ranks) * ratio > dense:
            break
        best = ranks
    return best


def low_rank_weight(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """A weight with a decaying spectrum (pretrained weights have one; random ones do not)."""
    rows, cols = shape[0], math.prod(shape[1:])
    k = min(rows, cols)
    u = torch.linalg.qr(torch.randn(rows, k, generator=g))[0]
    v = torch.linalg.qr(torch.randn(cols, k, generator=g))[0]
    s = torch.exp(-torch.arange(k, dtype=torch.float32) / (k / 4))
    return ((u * s) @ v.T).reshape(shape) / math.sqrt(cols)


def tn_linear(dense: nn.Linear, layout: str, ratio: float, closing: int) -> TNLinear:
    out_f, in_f = dense.weight.shape
    tz = ((in_f,), tn.factorize(out_f)) if layout == "whitened" else (tn.factorize(in_f), tn.factorize(out_f))
    modes = tuple(m for m in tz[0] + tz[1] if m > 1)
    ranks = ring_ranks(modes, in_f * out_f, ratio, closing)
    return TNLinear.from_dense(dense, "tr", ranks, tz, gated=False).eval()


def split_factors(cores: list[torch.Tensor], split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) with ``U @ V`` the network's (input x output) matrix: U (in, r0 * r_split)."""
    a = tn.merge_cores(cores[:split])  # (r0, P, rm)
    b = tn.merge_cores(cores[split:])  # (rm, Q, r0)
    r0, p, rm = a.shape
    return a.permute(1, 0, 2).reshape(p, r0 * rm), b.permute(2, 0, 1).reshape(r0 * rm, b.shape[1])


@torch.no_grad()
def linear_factors(layer: TNLinear) -> nn.Module:
    u, v = split_factors(list(layer.cores), len(layer.in_modes))
    first, second = nn.Linear(u.shape[0], u.shape[1], bias=False), nn.Linear(v.shape[0], v.shape[1])
    first.weight.copy_(u.T)
    second.weight.copy_(v.T)
    second.bias.copy_(layer.bias)
    return nn.Sequential(first, second).eval()


@torch.no_grad()
def conv_factors(layer: TNConv2d) -> nn.Module:
    u, v = split_factors(list(layer.cores), len(layer.in_modes) + 1)  # the kernel window is an input core
    kh, kw = layer.kernel_size
    r = u.shape[1]
    first = nn.Conv2d(layer.in_channels, r, layer.kernel_size, layer.stride, layer.padding, layer.dilation, bias=False)
    second = nn.Conv2d(r, layer.out_channels, 1)
    first.weight.copy_(u.reshape(layer.in_channels, kh * kw, r).permute(2, 0, 1).reshape(r, layer.in_channels, kh, kw))
    second.weight.copy_(v.T.reshape(layer.out_channels, r, 1, 1))
    second.bias.copy_(layer.bias)
    return nn.Sequential(first, second).eval()


class EmbeddingFactors(nn.Module):
    """An (V, r) table and an (r, D) matrix: the factors form of an embedding."""

    def __init__(self, layer: TNEmbedding):
        super().__init__()
        u, v = split_factors(list(layer.cores), len(layer.vocab_modes))
        self.table = nn.Embedding.from_pretrained(u[: layer.num_embeddings].detach().clone())
        self.out = nn.Linear(v.shape[0], v.shape[1], bias=False)
        with torch.no_grad():
            self.out.weight.copy_(v.T)

    def forward(self, idx):
        return self.out(self.table(idx))

    def head(self, x):
        """``x table^T``: the tied LM head computing from these factors."""
        return F.linear(F.linear(x, self.out.weight.T), self.table.weight)


# --------------------------------------------------------------------------- timing
def interleaved(fns: dict, repeats: int, budget: float = 0.004) -> dict:
    """Median seconds per call of each fn, in alternation; each fn runs enough times per
    repeat to take about ``budget`` seconds, so timer resolution never matters."""
    inner = {}
    with torch.no_grad():
        for k, f in fns.items():
            for _ in range(3):
                f()
            t = time.perf_counter()
            f()
            inner[k] = max(1, int(budget / max(time.perf_counter() - t, 1e-7)))
        times = {k: [] for k in fns}
        for _ in range(repeats):
            for k, f in fns.items():
                t = time.perf_counter()
                for _ in range(inner[k]):
                    f()
                times[k].append((time.perf_counter() - t) / inner[k])
    return {k: statistics.median(v) for k, v in times.items()}


def row(name: str, batch: str, fns: dict, repeats: int, extra: dict) -> dict:
    t = interleaved(fns, repeats)
    out = {"layer": name, "batch": batch, **extra, "seconds": {k: round(v, 9) for k, v in t.items()}}
    if "cores" in t:
        out["cores_over_factors"] = round(t["cores"] / t["factors"], 3)
        out["cores_over_dense"] = round(t["cores"] / t["dense"], 3)
        if "cores_before" in t:
            out["before_over_factors"] = round(t["cores_before"] / t["factors"], 3)
            out["speedup"] = round(t["cores_before"] / t["cores"], 3)
    print(f"{name:28s} {batch:>8s} " + " ".join(f"{k}={v * 1e6:9.1f}us" for k, v in t.items())
          + "  " + " ".join(f"{k}={v}" for k, v in out.items() if k.endswith(("factors", "dense", "speedup"))),
          flush=True)
    return out


# --------------------------------------------------------------------------- the cases
def llama_rows(old, repeats: int, g: torch.Generator) -> list[dict]:
    rows = []
    for in_f, out_f in LLAMA_LINEARS:
        dense = nn.Linear(in_f, out_f).eval()
        with torch.no_grad():
            dense.weight.copy_(low_rank_weight((out_f, in_f), g))
        for layout in ("whitened", "balanced"):
            layer = tn_linear(dense, layout, 1.5, closing=4)
            fns = {"dense": dense, "factors": linear_factors(layer), "cores": layer}
            if old is not None:
                fns["cores_before"] = twin(layer, old)
            extra = {"layout": layout, "modes": list(layer.modes), "ranks": layer.ranks,
                     "ratio": round(dense.weight.numel() / tn.param_count(layer.modes, layer.ranks), 2)}
            for batch, shape in (("1", (1, 1, in_f)), ("8x128", (8, 128, in_f))):
                x = torch.randn(shape, generator=g)
                rows.append(row(f"linear {in_f}->{out_f}", batch, {k: (lambda f=f: f(x)) for k, f in fns.items()},
                                repeats, extra))
    return rows


def embedding_rows(old, repeats: int, g: torch.Generator, vocab: int = 49152, dim: int = 576) -> list[dict]:
    dense = nn.Embedding(vocab, dim).eval()
    with torch.no_grad():
        dense.weight.copy_(low_rank_weight((vocab, dim), g))
    tz = ((vocab,), (dim,))  # the layout compress starts a tied embedding in (both sides whitened)
    modes = (vocab, dim)
    layer = TNEmbedding.from_dense(dense, "tr", ring_ranks(modes, vocab * dim, 1.5, 4), tz, gated=False).eval()
    head, factors = TiedTNLinear(layer).eval(), EmbeddingFactors(layer).eval()
    extra = {"modes": list(layer.modes), "ranks": layer.ranks,
             "ratio": round(vocab * dim / tn.param_count(layer.modes, layer.ranks), 2)}
    before = twin(layer, old) if old is not None else None
    rows = []
    for batch, shape in (("1", (1, 1)), ("8x128", (8, 128))):
        idx = torch.randint(0, vocab, shape, generator=g)
        fns = {"dense": lambda: dense(idx), "factors": lambda: factors(idx), "cores": lambda: layer(idx)}
        if before is not None:
            fns["cores_before"] = lambda: before(idx)
        rows.append(row("embedding 49152x576", batch, fns, repeats, extra))
    old_head = old.TiedTNLinear(before).eval() if old is not None else None
    for batch, shape in (("1", (1, 1, dim)), ("128", (1, 128, dim))):
        x = torch.randn(shape, generator=g)
        fns = {"dense": lambda: F.linear(x, dense.weight), "factors": lambda: factors.head(x), "cores": lambda: head(x)}
        if old_head is not None:
            fns["cores_before"] = lambda: old_head(x)
        rows.append(row("tied head 576->49152", batch, fns, repeats, extra))
    return rows


def lenet_models(old, g: torch.Generator) -> dict[str, nn.Module]:
    """LeNet-5 dense, and with conv2 and fc1 at about 20x as cores, cores before, factors."""
    dense = lenet5().eval()
    with torch.no_grad():
        for m in (dense.conv2, dense.fc1):
            m.weight.copy_(low_rank_weight(tuple(m.weight.shape), g) * 3)
    conv_tz = TNConv2d.tensorization(tuple(dense.conv2.weight.shape))
    conv_modes = TNConv2d.core_modes(tuple(dense.conv2.weight.shape), conv_tz)
    conv = TNConv2d.from_dense(dense.conv2, "tr", ring_ranks(conv_modes, dense.conv2.weight.numel(), 20, 2),
                               gated=False).eval()
    fc_tz = TNLinear.tensorization(tuple(dense.fc1.weight.shape))
    fc_modes = tuple(m for m in fc_tz[0] + fc_tz[1] if m > 1)
    fc = TNLinear.from_dense(dense.fc1, "tr", ring_ranks(fc_modes, dense.fc1.weight.numel(), 20, 2), gated=False).eval()
    models = {"dense": dense}
    for name, (c, f) in {"factors": (conv_factors(conv), linear_factors(fc)), "cores": (conv, fc)}.items():
        models[name] = _swapped(dense, c, f)
    if old is not None:
        models["cores_before"] = _swapped(dense, twin(conv, old), twin(fc, old))
    return models


def _swapped(model: nn.Module, conv2: nn.Module, fc1: nn.Module) -> nn.Module:
    import copy

    out = copy.deepcopy(model)
    out.conv2, out.fc1 = conv2, fc1
    return out.eval()


def lenet_rows(old, repeats: int, g: torch.Generator) -> list[dict]:
    models = lenet_models(old, g)
    rows = []
    for batch in (1, 256):
        img = torch.randn(batch, 1, 28, 28, generator=g)
        with torch.no_grad():
            mid = F.max_pool2d(F.relu(models["dense"].conv1(img)), 2)
            flat = torch.randn(batch, 1250, generator=g)
        for name, attr, x in (("lenet5 conv2", "conv2", mid), ("lenet5 fc1", "fc1", flat)):
            layer = models["cores"].get_submodule(attr)
            extra = {"modes": list(layer.modes), "ranks": layer.ranks,
                     "ratio": round(layer.dense_param_count() / layer.param_count(), 2)}
            fns = {k: (lambda m=m.get_submodule(attr): m(x)) for k, m in models.items()}
            rows.append(row(name, str(batch), fns, repeats, extra))
        rows.append(row("lenet5 model", str(batch), {k: (lambda m=m: m(img)) for k, m in models.items()}, repeats,
                        {}))
    return rows


def train_rows(old, repeats: int, g: torch.Generator) -> list[dict]:
    """A gated training step (forward with sampled gates, backward) of a TNLinear, this code vs
    the code before: the training path must not pay for the inference path's planning."""
    dense = nn.Linear(576, 576)
    with torch.no_grad():
        dense.weight.copy_(low_rank_weight((576, 576), g))
    rows = []
    for layout in ("whitened", "balanced"):
        plain = tn_linear(dense, layout, 1.5, closing=4)
        layer = TNLinear(**{f: plain.spec()[f] for f in TNLinear.spec_fields}, gated=True)
        layer.load_state_dict(plain.state_dict(), strict=False)
        layers = {"cores": layer.train()}
        if old is not None:
            layers["cores_before"] = old.TNLinear(**{f: plain.spec()[f] for f in TNLinear.spec_fields}, gated=True)
            layers["cores_before"].load_state_dict(layer.state_dict())
            layers["cores_before"].train()
        x = torch.randn(4, 128, 576, generator=g)

        def step(m):
            m.zero_grad(set_to_none=True)
            with torch.enable_grad():
                (m(x).square().mean() + 1e-3 * m.gate_penalty()).backward()

        t = interleaved({k: (lambda m=m: step(m)) for k, m in layers.items()}, repeats, budget=0.05)
        out = {"layer": "gated linear 576->576 train step", "batch": "4x128", "layout": layout,
               "ranks": layer.ranks, "seconds": {k: round(v, 6) for k, v in t.items()}}
        if "cores_before" in t:
            out["after_over_before"] = round(t["cores"] / t["cores_before"], 3)
        print(out, flush=True)
        rows.append(out)
    return rows


def tiny_llama(old, g: torch.Generator) -> dict[str, nn.Module]:
    """A 4-layer, 256-wide Llama (offline config, low-rank weights) dense, and with every block
    linear a ring at about 1.5x (whitened layout): cores, cores before, factors."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    dense = LlamaForCausalLM(cfg).eval()
    names = [n for n, m in dense.model.layers.named_modules() if isinstance(m, nn.Linear)]
    models = {"dense": dense, "cores": copy.deepcopy(dense), "factors": copy.deepcopy(dense)}
    if old is not None:
        models["cores_before"] = copy.deepcopy(dense)
    for n in names:
        lin = dense.model.layers.get_submodule(n)
        with torch.no_grad():
            lin.weight.copy_(low_rank_weight(tuple(lin.weight.shape), g) * 2)
        layer = tn_linear(nn.Linear(lin.in_features, lin.out_features), "whitened", 1.5, closing=4)
        layer.load_dense_(lin, ((lin.in_features,), tn.factorize(lin.out_features)), None)
        layer.bias = None
        parent, leaf = n.rsplit(".", 1)
        made = {"cores": layer, "factors": linear_factors_nobias(layer)}
        if old is not None:
            made["cores_before"] = twin(layer, old)
        for k, m in made.items():
            setattr(models[k].model.layers.get_submodule(parent), leaf, m)
    for k in models:
        if k != "dense":
            models[k].model.embed_tokens.weight = nn.Parameter(dense.model.embed_tokens.weight.detach().clone())
            models[k].lm_head.weight = nn.Parameter(dense.lm_head.weight.detach().clone())
        models[k].eval()
    return models


@torch.no_grad()
def linear_factors_nobias(layer: TNLinear) -> nn.Module:
    u, v = split_factors(list(layer.cores), len(layer.in_modes))
    first, second = nn.Linear(u.shape[0], u.shape[1], bias=False), nn.Linear(v.shape[0], v.shape[1], bias=False)
    first.weight.copy_(u.T)
    second.weight.copy_(v.T)
    return nn.Sequential(first, second).eval()


def llama_generate(old, repeats: int, g: torch.Generator, new_tokens: int = 32) -> dict:
    models = tiny_llama(old, g)
    prompt = torch.randint(0, 2048, (1, 8), generator=g)
    outs = {}

    def run(m):
        return m.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0)

    for k, m in models.items():
        outs[k] = run(m)[0, 8:].tolist()
    t = interleaved({k: (lambda m=m: run(m)) for k, m in models.items()}, max(5, repeats // 3), budget=0.0)
    tps = {k: round(new_tokens / v, 1) for k, v in t.items()}
    out = {"what": "tiny Llama (hidden 256, 4 layers, vocab 2048), greedy generate() of 32 tokens after 8, "
                   "block linears as rings at ~1.5x (whitened layout)",
           "tokens_per_second": tps,
           "cores_over_dense_speed": round(tps["cores"] / tps["dense"], 3),
           "cores_over_factors_speed": round(tps["cores"] / tps["factors"], 3),
           "same_tokens_as_factors": outs["cores"] == outs["factors"]}
    if "cores_before" in tps:
        out["speedup"] = round(tps["cores"] / tps["cores_before"], 3)
        out["before_over_dense_speed"] = round(tps["cores_before"] / tps["dense"], 3)
    print(out, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default=None, help="git ref whose code times cores_before (e.g. main); none: skip")
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--llama", action="store_true", help="also time a tiny Llama's greedy generate()")
    ap.add_argument("--only", nargs="*", default=None, help="only these groups: llama, embedding, lenet, train")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args()
    old = package_at(args.before) if args.before else None
    groups = {"llama": llama_rows, "embedding": embedding_rows, "lenet": lenet_rows, "train": train_rows}
    record = {"what": __doc__.split("\n\n")[0], "command": "python " + " ".join(sys.argv), "code": code_version(),
              "before": None, "threads": {}}
    if args.before:
        described = subprocess.run(["git", "-C", str(HERE.parent), "describe", "--always", args.before],
                                   capture_output=True, text=True)
        record["before"] = f"{args.before} ({described.stdout.strip()})"
    for n in args.threads:
        torch.set_num_threads(n)
        rows = []
        for name, fn in groups.items():
            if args.only is None or name in args.only:
                rows += fn(old, args.repeats, torch.Generator().manual_seed(0))
        record["threads"][str(n)] = {"rows": rows}
        if args.llama:
            g = torch.Generator().manual_seed(0)
            record["threads"][str(n)]["llama_generate"] = llama_generate(old, args.repeats, g)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
