"""How long form="auto" takes on a whole SmolLM2-135M-shaped slim model (211 layers, tied head).

The architecture comes from benchmarks/data/smollm2's config (no weights read); every projection
is a matrix-layout factorized layer (random cores) at the 1.5x CLI run's mean rank of its kind
+-20 (``results/smollm2_cli_1.5x.json``), the embedding at 278 with its tied head; ``tr`` as the
first argument builds rank-32 tensor rings instead. Prints the wall and CPU seconds of
``serving.choose`` at the default served shapes (a decode step, an 8 x 128 prefill).

    OMP_NUM_THREADS=1 python benchmarks/forms_smollm2.py [matrix|tr]
"""
import sys
import time
from pathlib import Path

import torch
import transformers
from torch import nn

from compressor import forms, serving
from compressor.layers import TiedTNLinear, TNEmbedding, TNLinear
from compressor.plan import count_state
from compressor.surgery import set_submodule

#: Mean learned rank of each projection in the 1.5x CLI run.
RANKS = {"q_proj": 128, "k_proj": 92, "v_proj": 137, "o_proj": 249, "gate_proj": 298, "up_proj": 309,
         "down_proj": 301}


def slim_model(layout: str) -> tuple[nn.Module, int]:
    """SmolLM2-135M's architecture with every layer factorized (random cores), and its dense size."""
    cfg = transformers.AutoConfig.from_pretrained(str(Path(__file__).parent / "data" / "smollm2"))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    dense = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.model.rotary_emb.__init__(cfg)  # its buffers were left empty by to_empty
    g = torch.Generator().manual_seed(0)

    def rnd(layer):
        with torch.no_grad():
            for c in layer.cores:
                c.copy_(torch.randn(c.shape, generator=g) / (c.shape[0] * c.shape[1]) ** 0.5)
        return layer.eval()

    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and name != "lm_head":
            r = RANKS[name.rsplit(".", 1)[1]] + int(torch.randint(-20, 21, (1,), generator=g))
            if layout == "matrix":
                tn = TNLinear(m.in_features, m.out_features, (m.in_features,), (m.out_features,), [r, 1], "tt",
                              bias=False, gated=False)
            else:
                tn = TNLinear.from_dense(m, "tr", 32, gated=False)
            set_submodule(model, name, rnd(tn))
    emb = (TNEmbedding(49152, 576, (49152,), (576,), [278, 1], "tt", gated=False) if layout == "matrix"
           else TNEmbedding.from_dense(model.model.embed_tokens, "tr", 32, gated=False))
    model.model.embed_tokens = rnd(emb)
    model.lm_head = TiedTNLinear(emb)
    return model.eval(), dense


def main() -> None:
    model, dense = slim_model(sys.argv[1] if len(sys.argv) > 1 else "matrix")
    size = count_state(model)
    print(f"{len(forms.groups(model))} factorized layers, {size:,} parameters (dense {dense:,})", flush=True)
    serve = serving.serving(model)
    t0, c0 = time.perf_counter(), time.process_time()
    choice = serving.choose(model, "auto", budget=size, serve=serve)
    print(f"choose at {serve.labels()}: {time.perf_counter() - t0:.1f} s wall, {time.process_time() - c0:.1f} s CPU; "
          f"forms {choice.counts()}; {choice.params:,} parameters")


if __name__ == "__main__":
    main()
