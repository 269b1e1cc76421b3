"""Batches and outputs the Hugging Face way: dict batches, ModelOutputs, token-level losses."""

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressor import compress, evaluate
from compressor.batches import Ran, forward, output_tensor, split_batch
from compressor.errors import DataError
from compressor.losses import count_correct, distill_loss, label_loss


class TokenTagger(nn.Module):
    """A tiny sequence model with Hugging Face manners: keyword inputs, a dict output."""

    def __init__(self, vocab=50, width=48, classes=50, causal=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.mix(self.emb(input_ids)))
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        return OrderedDict(logits=self.head(h), last_hidden_state=h)


class TaggerForCausalLM(TokenTagger):
    """Named like a causal LM: its labels are the inputs, shifted by one in the loss."""


def dict_batches(n=6, batch=8, length=10, vocab=50, labels=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[: batch // 2, length - 3:] = 0  # padded tails
        b = {"input_ids": ids, "attention_mask": mask}
        if labels == "ids":
            b["labels"] = ids.clone()
        out.append(b)
    return out


def test_split_batch_conventions():
    x, y = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    assert split_batch(x) == (x, None)
    assert split_batch((x, y)) == (x, y) and split_batch((x,)) == (x, None)
    inputs, labels = split_batch(((x, x), y))
    assert isinstance(inputs, tuple) and len(inputs) == 2 and labels is y
    inputs, labels = split_batch({"input_ids": x, "labels": y})
    assert inputs == {"input_ids": x} and labels is y
    with pytest.raises(DataError, match="sequence of 3"):
        split_batch((x, x, y))
    with pytest.raises(DataError, match="only labels"):
        split_batch({"labels": y})


def test_outputs_tensor_tuple_dict_and_model_output():
    transformers = pytest.importorskip("transformers")
    t = torch.randn(2, 5)
    assert output_tensor(t) == (t, "tensor")
    assert output_tensor((t, None))[0] is t
    out = transformers.modeling_outputs.SequenceClassifierOutput(logits=t)
    assert output_tensor(out) == (t, "logits")
    h = torch.randn(2, 4, 8)
    assert output_tensor(transformers.modeling_outputs.BaseModelOutput(last_hidden_state=h)) == (h, "hidden")
    with pytest.raises(DataError, match="keys: pooler_output"):
        output_tensor({"pooler_output": t})


def test_token_losses_ignore_padding():
    torch.manual_seed(0)
    s, t = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    real = mask.bool()
    kl = distill_loss(Ran(s, mask=mask, kind="logits"), Ran(t), "auto", 2.0)
    by_hand = sum(F.kl_div(F.log_softmax(s[b, i] / 2, -1), F.log_softmax(t[b, i] / 2, -1), log_target=True,
                           reduction="sum") for b in range(3) for i in range(5) if mask[b, i]) / real.sum() * 4
    assert float(kl) == pytest.approx(float(by_hand), rel=1e-5)
    s2 = s.clone()
    s2[~real] = 100.0  # whatever the model says on padding does not count
    assert float(distill_loss(Ran(s2, mask=mask, kind="logits"), Ran(t), "auto", 2.0)) == pytest.approx(float(kl))
    mse = distill_loss(Ran(s, mask=mask, kind="hidden"), Ran(t), "auto", 1.0)
    assert float(mse) == pytest.approx(float(((s - t)[real] ** 2).mean()), rel=1e-6)


def test_causal_label_loss_is_hugging_faces_own():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    hf_labels = ids.masked_fill(mask == 0, -100)  # how HF users mark padding
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, labels=hf_labels).loss
        ran = forward(model, {"input_ids": ids, "attention_mask": mask, "labels": ids})
    assert ran.next_token and ran.kind == "logits"
    assert float(label_loss(ran)) == pytest.approx(float(reference), rel=1e-5)
    right, counted = count_correct(ran)
    assert counted == int(mask[:, 1:].sum())
    with torch.no_grad():  # next-token hits counted by hand
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert right == int(((logits[:, :-1].argmax(-1) == ids[:, 1:]) & mask[:, 1:].bool()).sum())


def _next_token_accuracy(model, batches):
    """Top-1 next-token accuracy counted by hand: logits at t predict the token at t + 1,
    over the real (unmasked) target tokens only."""
    right = seen = 0
    with torch.no_grad():
        for b in batches:
            logits = model.eval()(b["input_ids"], b["attention_mask"])["logits"]
            keep = b["attention_mask"][:, 1:].bool()
            right += int(((logits[:, :-1].argmax(-1) == b["labels"][:, 1:]) & keep).sum())
            seen += int(keep.sum())
    return right / seen


def test_compress_a_model_fed_dict_batches_with_token_labels():
    torch.manual_seed(0)
    model = TaggerForCausalLM().eval()
    train, test = dict_batches(labels="ids"), dict_batches(n=2, labels="ids", seed=1)
    result = compress(model, train, target="2x", eval_loader=test, epochs=3, min_params=500)
    assert 2.0 <= result.report.ratio
    assert result.report.accuracy == pytest.approx(_next_token_accuracy(result.model, test), abs=1e-9)
    assert result.report.dense_accuracy == pytest.approx(_next_token_accuracy(model, test), abs=1e-9)
    assert {l.name for l in result.report.layers} == {"emb", "mix", "head"}


def test_the_report_counts_the_real_tokens_the_loss_saw():
    """3 epochs of 6 padded batches: 18 steps, each batch's attention_mask counted, not
    steps x batch x a mean length (images, which are not tokens, count none)."""
    torch.manual_seed(0)
    train = dict_batches(labels="ids")
    result = compress(TaggerForCausalLM().eval(), train, target="2x", epochs=3, min_params=500)
    per_epoch = sum(int(b["attention_mask"].sum()) for b in train)
    assert per_epoch < 6 * 8 * 10  # the padding is not counted
    assert result.report.steps == 18 and result.report.tokens_per_rank == [3 * per_epoch]
    images = [(torch.randn(8, 64), torch.randint(0, 4, (8,))) for _ in range(3)]
    mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    assert compress(mlp, images, target="2x", epochs=1, min_params=500).report.tokens_per_rank == [0]


def test_label_free_distillation_on_sequence_outputs():
    torch.manual_seed(0)
    model = TokenTagger().eval()
    with torch.no_grad():
        model.head.weight.mul_(8)  # confident, peaked token distributions: something to lose and regain
    held_out = dict_batches(n=1, seed=3)[0]

    def token_kl(slim):  # how far the compressed model's token distributions are from the original's
        with torch.no_grad():
            return float(distill_loss(Ran(slim(**held_out)["logits"], mask=held_out["attention_mask"], kind="logits"),
                                      Ran(model(**held_out)["logits"]), "kl", 1.0))

    events = []
    # gate_lr 0.05: this 24-step budget would get faster gates, whose rank choice is not what is tested here
    trained = compress(model, dict_batches(), target="2x", epochs=4, min_params=500, gate_lr=0.05,
                       callback=lambda e: events.append(e) if e.kind == "step" else None)
    untrained = compress(model, dict_batches(), target="2x", epochs=0, min_params=500)
    assert trained.report.ratio >= 2.0 and untrained.report.ratio >= 2.0
    assert all(math.isfinite(e.task_loss) for e in events)
    assert token_kl(trained.model) < 0.85 * token_kl(untrained.model)  # distillation healed part of the cut (0.71 measured)


def test_forward_fn_escape_hatch():
    torch.manual_seed(0)
    model = TokenTagger().eval()

    class Custom:  # a batch no convention covers
        def __init__(self, b):
            self.b = b

    def forward_fn(m, batch):
        return m(batch.b["input_ids"], batch.b["attention_mask"])["logits"], batch.b["labels"]

    train = [Custom(b) for b in dict_batches(labels="ids")]
    result = compress(model, train, target="2x", epochs=2, min_params=500, forward_fn=forward_fn,
                      eval_loader=train[:2])
    assert result.report.ratio >= 2.0 and result.report.accuracy is not None
    # The accuracy counted by hand: forward_fn returns no mask, so every token counts, and a
    # tagger's labels are not shifted.
    right = seen = 0
    with torch.no_grad():
        for c in train[:2]:
            logits = result.model.eval()(c.b["input_ids"], c.b["attention_mask"])["logits"]
            right += int((logits.argmax(-1) == c.b["labels"]).sum())
            seen += c.b["labels"].numel()
    assert right > 0  # a model that learned something: a zero from evaluate() cannot pass
    assert result.report.accuracy == pytest.approx(right / seen, abs=1e-9)
    assert evaluate(result.model, train[:2], forward_fn=forward_fn) == pytest.approx(right / seen, abs=1e-9)


@pytest.mark.parametrize("batch, fragment", [
    ({"input_ids": torch.zeros(2, 4, dtype=torch.long), "colour": torch.zeros(2)}, "with keys input_ids (2, 4), colour"),
    ({"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": torch.zeros(2, 3, dtype=torch.long)},
     "labels of shape (2, 3) for outputs (2, 4, 50)"),
    ({"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": torch.full((2, 4), 50)}, "label 50 is out of range"),
])
def test_bad_dict_batches_are_one_line(batch, fragment):
    with pytest.raises(DataError, match=None) as err:
        compress(TokenTagger().eval(), [batch], target="2x", epochs=1, min_params=500)
    assert fragment in str(err.value) and "\n" not in str(err.value)
