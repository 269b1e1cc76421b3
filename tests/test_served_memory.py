"""What a served slim model holds beside its cores (issue #28: a slim model must not need more
memory than the dense one).

A loaded layer's cores are laid out so the ``F.linear`` weights it serves from are views of
them, not copies (``lay_out_for_serving_``); the values, the outputs and training are unchanged;
a tied head writes its padding logit into its own output instead of copying the logits.
"""

import gc
import weakref

import pytest
import torch
from torch import nn

from compressor import forms, layers
from compressor.blueprint import Blueprint
from compressor.checkpoint import load, save
from compressor.layers import TiedTNLinear, TNEmbedding, TNLinear
from compressor.plan import count_state
from compressor.surgery import tn_layers


def cached_bytes_beside(layer) -> int:
    """Bytes of the layer's kept values whose memory is not one of its parameters'."""
    own = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    total, seen = 0, set()
    for _, value in layer.__dict__["_frozen"]._values.values():
        for t in value if isinstance(value, tuple) else (value,):
            storage = t.untyped_storage()
            if storage.data_ptr() not in own and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def _random(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer.eval()


def _served(module, x):
    with torch.no_grad():
        return module(x)


# (in, out, in modes, out modes, ranks): one core a side (a low-rank pair, train or ring), several
# cores on the input side, several on the output side
LINEARS = {
    "tt pair": (60, 24, (60,), (24,), [5, 1], "tt"),
    "tt pair, wide": (24, 60, (24,), (60,), [5, 1], "tt"),
    "tr pair": (60, 24, (60,), (24,), [4, 3], "tr"),
    "tt three cores": (60, 24, (6, 10), (24,), [3, 4, 1], "tt"),
    "tr three cores, out": (20, 96, (20,), (8, 12), [2, 3, 2], "tr"),
}


@pytest.mark.parametrize("name", sorted(LINEARS))
def test_a_laid_out_linear_serves_views_of_its_cores_and_computes_the_same(name):
    in_f, out_f, in_modes, out_modes, ranks, decomp = LINEARS[name]
    torch.manual_seed(0)
    layer = _random(TNLinear(in_f, out_f, in_modes, out_modes, ranks, decomp, gated=False).double())
    x = torch.randn(3, in_f, dtype=torch.float64)
    with torch.enable_grad():
        want = layer(x).detach()
    before = [c.detach().clone() for c in layer.cores]
    layer.lay_out_for_serving_()
    assert all(torch.equal(c, b) for c, b in zip(layer.cores, before))  # values untouched
    assert torch.allclose(_served(layer, x), want, rtol=1e-12, atol=1e-12)
    single = [len(in_modes) == 1, len(out_modes) == 1]
    beside = cached_bytes_beside(layer)
    if all(single):
        assert beside == 0
    else:  # the side of several cores is their product, the single side a view
        inner = layer.cores[0].shape[0] * layer.cores[len(in_modes)].shape[0]
        assert beside == inner * (in_f if single[1] else out_f) * 8


def test_before_the_layout_the_first_factor_was_a_copy_beside_the_cores():
    """What the layout saves: the same layer, contiguous, keeps its (r x in) first factor apart."""
    layer = _random(TNLinear(60, 24, (60,), (24,), [5, 1], "tt", gated=False))
    _served(layer, torch.randn(1, 60))
    assert cached_bytes_beside(layer) == 5 * 60 * 4
    layer.lay_out_for_serving_()
    _served(layer, torch.randn(1, 60))
    assert cached_bytes_beside(layer) == 0


def test_view_orders_leave_a_layer_served_dense_and_a_padded_side_alone():
    assert layers.view_orders([(1, 6, 5), (5, 4, 1)], 1, 6, 4) == [None, None]  # 5 * 10 >= 24: served dense
    assert layers.view_orders([(1, 64, 2), (2, 60, 1)], 1, 60, 60) == [None, (2, 0, 1)]  # 64 rows padded to 60


class TiedLM(nn.Module):
    def __init__(self, vocab=96, width=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=3)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def _slim_lm():
    model = TiedLM()
    dense = count_state(model)
    model.embed = _random(TNEmbedding(96, 16, (96,), (16,), [4, 1], "tt", padding_idx=3, gated=False), 1)
    model.head = TiedTNLinear(model.embed)
    model.mix = _random(TNLinear(16, 16, (16,), (16,), [3, 1], "tt", gated=False), 2)
    return model.eval(), dense


def test_a_loaded_model_serves_without_copies_beside_its_cores_and_still_trains_and_saves(tmp_path):
    torch.manual_seed(0)
    model, dense = _slim_lm()
    path = tmp_path / "lm.safetensors"
    save(model, path, blueprint=Blueprint("module", dense, target=1.2))
    ids = torch.randint(0, 96, (2, 7))
    ids[0, 0] = 3  # the padding row's logit and lookup
    want = _served(model, ids)
    loaded = load(path, base=TiedLM)
    assert torch.allclose(_served(loaded, ids), want, atol=1e-6)
    for layer in tn_layers(loaded).values():
        assert len(layer.__dict__["_frozen"]) >= 1 and cached_bytes_beside(layer) == 0
    # still a model one fine-tunes and saves again
    loaded.train()
    opt = torch.optim.Adam(loaded.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        loaded(ids).logsumexp(-1).mean().backward()
        opt.step()
    loaded.eval()
    with torch.enable_grad():
        trained = loaded(ids).detach()
    assert not torch.allclose(trained, want, atol=1e-4)
    assert torch.allclose(_served(loaded, ids), trained, atol=1e-5)
    save(loaded, tmp_path / "again.safetensors", blueprint=Blueprint("module", dense, target=1.2))
    assert torch.allclose(_served(load(tmp_path / "again.safetensors", base=TiedLM), ids), trained, atol=1e-5)


def test_a_served_tied_head_writes_the_padding_logit_into_its_own_output(monkeypatch):
    """No second logits tensor: the output is the one the matrices made, its padding column set."""
    torch.manual_seed(0)
    model, _ = _slim_lm()
    made = []
    through = layers.linear_through
    monkeypatch.setattr(layers, "linear_through", lambda *a: made.append(through(*a)) or made[-1])
    h = torch.randn(2, 5, 16)
    with torch.enable_grad():
        want = model.head(h).detach()
    got = _served(model.head, h)
    assert got.untyped_storage().data_ptr() == made[-1].untyped_storage().data_ptr()
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got[..., 3], h @ model.embed.padding_row, atol=1e-5)


def test_converting_a_loaded_model_lets_its_cores_and_kept_values_go(tmp_path):
    """A served form from ``convert`` holds no cores beside it: the loaded layers, their cores
    and the matrices their weight cache kept are all freed once the model is converted."""
    torch.manual_seed(0)
    model, dense = _slim_lm()
    save(model, tmp_path / "lm.safetensors", blueprint=Blueprint("module", dense, target=1.2))
    loaded = load(tmp_path / "lm.safetensors", base=TiedLM)
    ids = torch.randint(0, 96, (2, 7))
    want = _served(loaded, ids)
    held = [weakref.ref(t) for layer in tn_layers(loaded).values() for t in
            list(layer.cores) + [m for _, v in layer.__dict__["_frozen"]._values.values()
                                 for m in (v if isinstance(v, tuple) else (v,))]]
    assert len(held) > 6
    forms.convert(loaded, "factors")
    gc.collect()
    assert [r() for r in held] == [None] * len(held)
    assert torch.allclose(_served(loaded, ids), want, atol=1e-5)


# ------------------------------------------------------------------ loading a part at a time
def test_the_file_is_read_one_tensor_at_a_time_with_the_values_safetensors_reads(tmp_path):
    from safetensors.torch import load_file, save_file

    from compressor.errors import CheckpointError
    from compressor.files import read_safetensors_each

    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(3, 4, generator=g), "q": torch.randint(-9, 9, (7,), generator=g, dtype=torch.int8),
               "s": torch.tensor(2.5), "h": torch.randn(2, 3, generator=g).to(torch.bfloat16),
               "i": torch.arange(5), "e": torch.zeros(0, 3)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    got = list(read_safetensors_each(path, CheckpointError, "checkpoint"))
    want = load_file(str(path))
    assert sorted(n for n, _ in got) == sorted(want)
    assert all(t.dtype == want[n].dtype and torch.equal(t, want[n]) for n, t in got)
    path.write_bytes(path.read_bytes()[:-6])  # truncated
    with pytest.raises(CheckpointError, match="checkpoint"):
        list(read_safetensors_each(path, CheckpointError, "checkpoint"))


def test_a_model_loaded_in_small_parts_is_the_model_saved(tmp_path, monkeypatch):
    from compressor import checkpoint

    torch.manual_seed(0)
    model, dense = _slim_lm()
    save(model, tmp_path / "lm.safetensors", blueprint=Blueprint("module", dense, target=1.2))
    calls = []
    monkeypatch.setattr(checkpoint, "LOAD_PART_BYTES", 1)  # one tensor a part
    monkeypatch.setattr(TiedLM, "load_state_dict", lambda self, part, strict: calls.append(len(part)) or
                        nn.Module.load_state_dict(self, part, strict=strict), raising=False)
    loaded = load(tmp_path / "lm.safetensors", base=TiedLM)
    assert len(calls) >= len(loaded.state_dict()) - 1  # the tied head's alias comes with its tensor
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
