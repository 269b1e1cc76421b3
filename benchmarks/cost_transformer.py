"""What a gated training step costs on a transformer, measured side by side in one process.

A BERT-style encoder stack (384 wide, FFN 1536, 2 layers; vocabulary 30522 as in
MiniLM-class sentence encoders), batch 32 x 64 tokens, label-free distillation on the last
hidden state as ``compress`` does it. Three configurations at the same ranks, timed in
alternation (medians, so the *ratios* survive a noisy machine):

* dense: the original model;
* tr: the factorized model without gates;
* gated_tr: with an l0 gate on every bond (what the gate phase trains).

Starts compared: the faithful start (``--start faithful``, each layer from its weights within
2 %) and the old ladder at rank 64 (``--start ladder``, the issue's 2.2x figure). The weights
are made low-rank plus 1 % noise, as pretrained weights tend to be (random weights have no
low-rank structure to keep). For each linear layer the row says which way the forward
contracts at this batch size (opt_einsum's FLOP-optimal order): ``input-first`` (the input
meets a core first) or ``rebuild`` (the cores are joined into the weight first).

The ``gated_tr`` step here is the same distillation step with the gates riding along in one
Adam (no λ · penalty, no controller): it prices the gates in the forward and backward only.

    python benchmarks/cost_transformer.py [--repeats 7] [--out PATH]
    python benchmarks/cost_transformer.py --report   # only render the documents' table
Writes benchmarks/results/cost_transformer.json (and renders the documents) unless ``--out``
says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from compressor.plan import count_state  # noqa: E402
from compressor.surgery import set_training, tn_layers  # noqa: E402
from compressor.layers import TNLinear  # noqa: E402

from cost import gated_model, interleaved, ungated  # noqa: E402  (the LeNet-5 cost script's helpers)
from provenance import code_version  # noqa: E402
from render import output_arguments, render_from, write_result  # noqa: E402

DEFAULT_OUT = HERE / "results" / "cost_transformer.json"


def encoder(vocab=30522, width=384, layers=2):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=6,
                     intermediate_size=4 * width, max_position_embeddings=128)
    model = BertModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # low rank + 1 % noise: the structure trained weights have
        for p in model.parameters():
            if p.dim() == 2 and min(p.shape) > 32:
                k = min(p.shape)
                u = torch.linalg.qr(torch.randn(p.shape[0], k, generator=g))[0]
                v = torch.linalg.qr(torch.randn(p.shape[1], k, generator=g))[0]
                s = torch.exp(-torch.arange(k, dtype=torch.float32) / (k / 8))
                w = (u * s) @ v.T
                w = w / w.norm() * p.norm()
                p.copy_(w + 0.01 * p.norm() / p.numel() ** 0.5 * torch.randn(p.shape, generator=g))
    return model


def path_kind(layer: TNLinear, tokens: int) -> str:
    shapes = [(tokens,) + layer.in_modes] + [tuple(c.shape) for c in layer.cores]
    first = layer._einsum.path(shapes)[0]
    return "input-first" if 0 in first else "rebuild"


def step_fn(model, teacher_out, batch):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(**batch).last_hidden_state
        F.mse_loss(out[batch["attention_mask"].bool()], teacher_out).backward()
        opt.step()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    output_arguments(ap, DEFAULT_OUT)
    args = ap.parse_args()
    if args.report:
        return render_from(DEFAULT_OUT.name)
    code = code_version()
    dense = encoder()
    batch = {"input_ids": torch.randint(0, 30522, (32, 64)),
             "attention_mask": torch.ones(32, 64, dtype=torch.long)}
    with torch.no_grad():
        teacher_out = dense(**batch).last_hidden_state[batch["attention_mask"].bool()]
    tokens = 32 * 64
    result = {"batch": [32, 64], "dense_params": count_state(dense), "starts": {}}
    for start in ("faithful", "ladder"):
        g = gated_model(dense, "l0", 2.0, example=batch, start=start, rank=64 if start == "ladder" else None)
        models = {"dense": dense, "tr": ungated(g), "gated_tr": g}
        for m in models.values():
            set_training(m, True)
        t = interleaved({k: step_fn(m, teacher_out, batch) for k, m in models.items()}, args.repeats, 1, warmup=1)
        layers = {n: {"ranks": l.ranks, "modes": list(l.modes), "path": path_kind(l, tokens)}
                  for n, l in tn_layers(g).items() if isinstance(l, TNLinear)}
        row = {"seconds": t, "tr_vs_dense": t["tr"] / t["dense"], "gated_vs_dense": t["gated_tr"] / t["dense"],
               "gated_vs_tr": t["gated_tr"] / t["tr"], "start_ratio": count_state(dense) / count_state(ungated(g)),
               "paths": {p: sum(1 for v in layers.values() if v["path"] == p) for p in ("input-first", "rebuild")},
               "layers": layers}
        result["starts"][start] = row
        print(f"{start}: dense {t['dense'] * 1e3:.0f} ms, tr {t['tr'] * 1e3:.0f} ms, gated {t['gated_tr'] * 1e3:.0f} ms"
              f" -> gated/dense {row['gated_vs_dense']:.2f}, start {row['start_ratio']:.2f}x, paths {row['paths']}")
    result.update(command=" ".join(["python"] + sys.argv), code=code, threads=torch.get_num_threads())
    write_result(result, Path(args.out), DEFAULT_OUT)


if __name__ == "__main__":
    main()
