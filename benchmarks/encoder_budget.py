"""Does a default run on a sentence encoder finish in minutes, and keep its embeddings?

The case of issue 30: a 22M-parameter BERT-style sentence encoder (6 layers, 384 wide, a
30,522-token vocabulary), 700 sentences given as tokenizer dicts, ``compress(model, batches,
target="2x")`` and nothing else. The encoder is built here, not downloaded:

* **the model**: ``transformers.BertConfig`` at random init, then **briefly trained** with
  masked-language modelling on Shakespeare sentences (``--pretrain-steps``, default 400; the
  trained weights are cached in ``benchmarks/data/encoder_budget/``), so its layers carry
  structure a random network does not. It is not a real pretrained encoder: the cosine a
  real one keeps may differ;
* **the tokenizer**: words and punctuation hashed into the vocabulary (crc32), so the whole
  embedding table is in use and nothing is downloaded;
* **the data**: 700 training sentences (6 to 40 words) from ``benchmarks/data/shakespeare/
  train.txt`` in batches of 32 (22 batches, no labels: the run distils the encoder's hidden
  states), 200 held-out sentences from ``test.txt``.

It reports the wall time of ``compress``, its steps (planned and taken, per phase), why it
stopped, and the held-out **mean cosine** between the compressed and the original sentence
embeddings (mean of the last hidden states over real tokens), into
``benchmarks/results/encoder_budget.json`` (``--quick``: ``encoder_budget_quick.json``) with
the ``code`` that made it (``provenance.py``). ``--epochs`` / ``--max-steps`` reproduce a
fixed budget (``--epochs 100`` is the old default for this data: 2,200 steps).

    python benchmarks/encoder_budget.py                 # the default run (minutes on 2 cores)
    python benchmarks/encoder_budget.py --epochs 100    # the old default budget, for before -> after
    python benchmarks/encoder_budget.py --quick         # a 2-layer, 64-wide encoder, --time-budget 60s: a smoke test
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from compressor import compress  # noqa: E402
from compressor.plan import count_state  # noqa: E402
from provenance import code_version  # noqa: E402
from render import output_arguments, render_from  # noqa: E402

TEXT = HERE / "data" / "shakespeare"
CACHE = HERE / "data" / "encoder_budget"
RESULTS = HERE / "results"
PAD, CLS, SEP, MASK, FIRST_WORD = 0, 101, 102, 103, 1000
#: (layers, width, heads, vocabulary, training sentences, held-out sentences, pretraining steps)
SIZES = {"full": (6, 384, 12, 30522, 700, 200, 400), "quick": (2, 64, 4, 2000, 96, 32, 40)}
BATCH, MAX_LENGTH = 32, 64
#: ``--quick`` runs the default budget under this time budget unless told otherwise.
QUICK_TIME_BUDGET = "60s"


def sentences(path: Path, count: int, skip: int = 0) -> list[str]:
    """``count`` sentences of 6 to 40 words from ``path``, after skipping ``skip`` of them."""
    found = []
    for line in path.read_text(encoding="utf-8").splitlines():
        for s in re.split(r"(?<=[.!?])\s+", line):
            if 6 <= len(s.split()) <= 40:
                found.append(s)
                if len(found) == skip + count:
                    return found[skip:]
    raise SystemExit(f"{path} has fewer than {skip + count} sentences of 6 to 40 words")


def tokenize(texts: list[str], vocab: int) -> dict[str, torch.Tensor]:
    """Words and punctuation hashed into ``vocab`` ids, [CLS] ... [SEP], padded: a tokenizer dict."""
    rows = []
    for text in texts:
        words = re.findall(r"\w+|[^\w\s]", text.lower())[: MAX_LENGTH - 2]
        rows.append([CLS] + [FIRST_WORD + zlib.crc32(w.encode()) % (vocab - FIRST_WORD) for w in words] + [SEP])
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": (ids != PAD).long()}


def batches(tokens: dict[str, torch.Tensor], size: int = BATCH) -> list[dict[str, torch.Tensor]]:
    """Batches of ``size`` sentences, each cut to its own longest sentence."""
    out = []
    for i in range(0, len(tokens["input_ids"]), size):
        mask = tokens["attention_mask"][i:i + size]
        width = int(mask.sum(1).max())
        out.append({"input_ids": tokens["input_ids"][i:i + size, :width], "attention_mask": mask[:, :width]})
    return out


def encoder(size: str, steps: int, train: list[dict[str, torch.Tensor]], seed: int = 0) -> torch.nn.Module:
    """The BERT-style encoder, trained for ``steps`` masked-language-modelling steps (cached)."""
    from transformers import BertConfig, BertForMaskedLM

    layers, width, heads, vocab = SIZES[size][:4]
    config = BertConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * width, max_position_embeddings=128)
    torch.manual_seed(seed)
    mlm = BertForMaskedLM(config)
    cached = CACHE / f"{size}_mlm{steps}_seed{seed}.pt"
    if cached.exists():
        mlm.load_state_dict(torch.load(cached, weights_only=True))
    else:
        _pretrain(mlm, train, steps, vocab)
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save(mlm.state_dict(), cached)
    return mlm.bert.eval()


def _pretrain(mlm: torch.nn.Module, train: list[dict[str, torch.Tensor]], steps: int, vocab: int) -> None:
    """Masked-language modelling: 15 % of the real tokens masked, Adam at 5e-4."""
    opt = torch.optim.Adam(mlm.parameters(), lr=5e-4)
    mlm.train()
    t0 = time.perf_counter()
    for step in range(steps):
        batch = train[step % len(train)]
        ids, mask = batch["input_ids"], batch["attention_mask"]
        chosen = (torch.rand(ids.shape) < 0.15) & (ids >= FIRST_WORD)
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        loss = mlm(input_ids=torch.where(chosen, torch.full_like(ids, MASK), ids), attention_mask=mask,
                   labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            print(f"pretraining step {step + 1}/{steps}: MLM loss {float(loss.detach()):.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    mlm.eval()


@torch.no_grad()
def embeddings(model: torch.nn.Module, held_out: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Sentence embeddings: the last hidden states averaged over real tokens."""
    model.eval()
    out = []
    for batch in held_out:
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def run(args: argparse.Namespace) -> dict[str, Any]:
    size = "quick" if args.quick else "full"
    layers, width, _, vocab, n_train, n_held, pretrain = SIZES[size]
    train = batches(tokenize(sentences(TEXT / "train.txt", n_train), vocab))
    held_out = batches(tokenize(sentences(TEXT / "test.txt", n_held), vocab))
    model = encoder(size, args.pretrain_steps if args.pretrain_steps is not None else pretrain, train)
    reference = embeddings(model, held_out)
    events: list[str] = []

    def said(event) -> None:
        if event.kind in ("stage", "freeze", "force", "end") and event.message:
            events.append(f"[step {event.step}] {event.message}")
            print(events[-1], flush=True)

    options = {k: v for k, v in (("epochs", args.epochs), ("max_steps", args.max_steps),
                                 ("time_budget", args.time_budget)) if v is not None}
    if args.quick and not options:
        options["time_budget"] = QUICK_TIME_BUDGET  # a smoke test: the default budget, cut to a minute
    t0 = time.perf_counter()
    result = compress(model, train, target=args.target, callback=said, **options)
    seconds = time.perf_counter() - t0
    cosine = torch.nn.functional.cosine_similarity(embeddings(result.model, held_out), reference, dim=-1)
    rep = result.report
    return {"size": size, "layers": layers, "width": width, "vocab": vocab, "dense_params": count_state(model),
            "train_sentences": n_train, "held_out_sentences": n_held, "batches": len(train),
            "pretrain_steps": args.pretrain_steps if args.pretrain_steps is not None else pretrain,
            "target": args.target, "options": options, "ratio": rep.ratio, "seconds": seconds,
            "steps": rep.steps, "planned_steps": rep.planned_steps, "stopped": rep.stopped, "phases": rep.phases,
            "budget": rep.budget, "early_stop": rep.early_stop, "tokens": sum(rep.tokens_per_rank),
            "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()), "chosen": rep.chosen,
            "events": events, "torch_threads": torch.get_num_threads(), "code": code_version()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a 2-layer, 64-wide encoder on 96 sentences (smoke test)")
    ap.add_argument("--target", default="2x")
    ap.add_argument("--epochs", type=int, default=None, help="a fixed budget instead of the default")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--time-budget", default=None, help="e.g. 10m")
    ap.add_argument("--pretrain-steps", type=int, default=None, help="MLM steps before compressing (default 400; "
                                                                      "quick 40)")
    output_arguments(ap, RESULTS / "encoder_budget.json")
    args = ap.parse_args()
    if args.report:
        return render_from("encoder_budget.json")
    record = run(args)
    out = RESULTS / "encoder_budget_quick.json" if args.quick else Path(args.out)
    runs = json.loads(out.read_text())["runs"] if out.exists() else []
    runs = [r for r in runs if (r["options"], r["target"]) != (record["options"], record["target"])] + [record]
    out.write_text(json.dumps({"benchmark": "encoder_budget", "runs": runs}, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("seconds", "steps", "planned_steps", "stopped", "ratio",
                                             "cosine_mean", "phases")}, indent=1))
    print(f"wrote {out}")
    if out.resolve() == (RESULTS / "encoder_budget.json").resolve():
        render_from(out.name)


if __name__ == "__main__":
    main()
