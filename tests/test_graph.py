"""The model pass: planning and applying mutate nothing they are given, and say where layers went."""

import copy
import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressor import compress, load, save
from compressor.checkpoint import read_metadata
from compressor.config import CompressConfig
from compressor.data import TensorLoader
from compressor.errors import CheckpointError, ModelError
from compressor.plan import Site, planned_starts
from compressor.planner import plan
from compressor.surgery import apply, set_submodule, tn_layers
from compressor.layers import TiedTNLinear, TNLinear

FULL = CompressConfig(target=1.1, rank=4096, decomp="tt", min_params=0)  # every bond at its exact rank


def _apply(model, the_plan, config=FULL):
    """``apply`` with every layer at the plan's own layout and the user's rank (``config.rank``)."""
    return apply(model, the_plan, planned_starts(the_plan, config.decomp), sigma=config.sigma, seed=config.seed)


class Gained(nn.Module):
    """A weight used through F.linear by a module that also owns another tensor (a gain)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(64, 48) / 7)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 64))

    def forward(self, x):
        return F.linear(x, self.weight) * self.gain


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Gained()
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(torch.relu(self.block(x)))


def _program(model, x):
    return torch.export.export(model, (x[:4].clone(),), dynamic_shapes=({0: torch.export.Dim("b")},))


def test_apply_leaves_the_plan_and_model_alone_and_reports_sites():
    torch.manual_seed(0)
    model = Net().eval()
    config = CompressConfig(target=1.2, rank=64, decomp="tt", min_params=0)
    the_plan = plan(model, config.plan_options())  # fx sees head (a Linear); block's F.linear is not a module call
    before_plan, before_state = copy.deepcopy(the_plan), copy.deepcopy(model.state_dict())
    applied = _apply(model, the_plan, config)
    assert the_plan == before_plan
    assert all(torch.equal(v, before_state[k]) for k, v in model.state_dict().items())
    assert applied.sites == {"head": Site("head")}
    assert applied.homeless == set()
    assert set(tn_layers(applied.model)) == set(applied.sites)


def test_graph_layer_whose_name_is_taken_lives_under_a_new_name_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(256, 48)
    program = _program(model, x)
    config = CompressConfig(target=1.5, rank=64, decomp="tt", min_params=0)
    the_plan = plan(program, config.plan_options())
    names = [lp.name for lp in the_plan.layers]
    assert "block" in names
    applied = _apply(program, the_plan, config)
    assert [lp.name for lp in the_plan.layers] == names  # the plan is never renamed
    assert applied.sites["block"] == Site("block_tn", "block.weight", None)
    assert applied.homeless == {"block_tn"}
    with torch.no_grad():  # full-rank TT-SVD: the factorized graph computes what the original did
        assert (applied.model(x) - model(x)).abs().max() < 1e-4

    res = compress(program, TensorLoader(x, None, 64), "tt", 1.5, min_params=0, epochs=1)
    assert "block_tn" in {l.name for l in res.report.layers}
    path = save(res, tmp_path / "slim.safetensors")
    back = load(path, base=program)
    with torch.no_grad():
        assert torch.equal(back(x), res.model(x))


# ------------------------------------------------------------------ torch.nn internals, subclasses, reuse
class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.layer(x))


@pytest.mark.parametrize("example", [True, False])
def test_transformer_encoder_layer_out_proj_is_skipped_and_its_mlp_compressed(example):
    torch.manual_seed(0)
    model = Encoder().eval()
    x = torch.randn(3, 6, 32)
    if example:
        the_plan = plan(model, FULL.plan_options(), example=x)
        assert the_plan.source == "export"
    else:
        with pytest.warns(UserWarning, match="could not trace"):
            the_plan = plan(model, FULL.plan_options())
    reasons = {s.name: s.reason for s in the_plan.skipped}
    assert reasons == {"layer.self_attn.out_proj": "nn.MultiheadAttention computes with out_proj.weight itself "
                                                   "(F.multi_head_attention_forward), not by calling the layer"}
    assert {lp.name for lp in the_plan.layers} == {"layer.linear1", "layer.linear2", "head"}
    slim = _apply(model, the_plan).model
    with torch.no_grad():  # eval + no_grad takes torch's fused fast path, which reads linear1.weight itself
        assert (slim(x) - model(x)).abs().max() < 1e-4
    assert (slim(x) - model(x)).abs().max() < 1e-4


class Reuse(nn.Module):
    """A Linear called twice, a tie by use (F.linear on the embedding), a subclass computing
    something else, and an unused layer."""

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(60, 24)
        self.block = nn.Linear(24, 24)
        self.scaled = self.Scaled(24, 24)
        self.unused = nn.Linear(24, 24)

    def forward(self, idx):
        h = torch.tanh(self.block(self.emb(idx)))
        h = torch.tanh(self.block(h))
        h = self.scaled(h)
        return torch.nn.functional.linear(h, self.emb.weight)


@pytest.mark.parametrize("example", [True, False])
def test_reused_and_functionally_tied_weights_are_planned_once_and_explained(example, monkeypatch):
    torch.manual_seed(0)
    model = Reuse().eval()
    idx = torch.randint(0, 60, (4, 5))
    if example:  # make fx fail so the export analysis runs
        import compressor.trace as trace

        monkeypatch.setattr(trace, "_fx_reads", lambda m: (_ for _ in ()).throw(RuntimeError("no fx")))
    the_plan = plan(model, FULL.plan_options(), example=idx)
    assert the_plan.source == ("export" if example else "module")
    assert [lp.name for lp in the_plan.layers] == ["block"]  # called twice, planned once
    reasons = {s.name: s.reason for s in the_plan.skipped}
    assert set(reasons) == {"emb", "scaled", "unused"}
    assert "read outside the layer, by the model's forward" in reasons["emb"]
    assert reasons["scaled"] == "subclass Scaled of Linear overrides forward"
    assert reasons["unused"].startswith("never called by forward()")
    slim = _apply(model, the_plan).model
    with torch.no_grad():
        assert (slim(idx) - model(idx)).abs().max() < 1e-4


class Aliased(nn.Module):
    """One Linear registered under two names (as T5's ``shared`` is also ``encoder.embed_tokens``)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(24, 24)
        self.inner = nn.Module()
        self.inner.b = self.a

    def forward(self, x):
        return self.inner.b(torch.tanh(self.a(x)))


def test_a_module_under_two_names_is_replaced_under_both_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = Aliased().eval()
    x = torch.randn(5, 24)
    the_plan = plan(model, FULL.plan_options())
    assert [lp.name for lp in the_plan.layers] == ["a"] and not the_plan.skipped
    slim = _apply(model, the_plan).model
    assert slim.a is slim.inner.b and isinstance(slim.a, TNLinear)
    back = load(save(slim, tmp_path / "aliased.safetensors"), base=Aliased)
    assert back.a is back.inner.b
    with torch.no_grad():
        assert (back(x) - model(x)).abs().max() < 1e-4


# ------------------------------------------------------------------ checkpoints with ties
class TwoHeads(nn.Module):
    """An embedding shared by two output heads, one with a bias of its own."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(60, 24)
        self.head = nn.Linear(24, 60, bias=False)
        self.head2 = nn.Linear(24, 60)
        self.head.weight = self.head2.weight = self.emb.weight

    def forward(self, idx):
        h = self.emb(idx)
        return self.head(h) + self.head2(torch.tanh(h))


def test_options_for_a_tied_head_belong_to_its_source_and_an_unused_tied_head_is_tied_along():
    torch.manual_seed(0)
    model = TwoHeads().eval()
    with pytest.raises(ModelError, match="head shares its weight with emb: give its per-layer options to emb"):
        plan(model, replace(FULL, layer_ranks={"head": 4}).plan_options())
    model.forward = lambda idx: model.head2(model.emb(idx))  # head is never called now
    the_plan = plan(model, FULL.plan_options())
    assert the_plan.source == "module" and the_plan.layers[0].tied == ("head", "head2")
    slim = _apply(model, the_plan).model
    assert not any(t.shape == (60, 24) for t in slim.state_dict().values())  # no dense copy left behind


def test_a_tie_whose_source_went_dense_refuses_to_save(tmp_path):
    torch.manual_seed(0)
    model = TwoHeads().eval()
    the_plan = plan(model, FULL.plan_options())
    assert the_plan.layers[0].tied == ("head", "head2") and len(the_plan.layers) == 1
    slim = _apply(model, the_plan).model
    assert isinstance(slim.head, TiedTNLinear) and slim.head2.source is slim.emb and slim.head2.bias is not None
    idx = torch.randint(0, 60, (3, 4))
    with torch.no_grad():
        assert (slim(idx) - model(idx)).abs().max() < 1e-4
    set_submodule(slim, "emb", slim.emb.to_dense())
    with pytest.raises(CheckpointError, match="no longer in the model"):
        save(slim, tmp_path / "x.safetensors")


def test_a_doctored_tie_entry_is_refused_before_anything_is_built(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = TwoHeads().eval()
    slim = _apply(model, plan(model, FULL.plan_options())).model
    path = save(slim, tmp_path / "tied.safetensors")
    meta = read_metadata(path)
    assert meta["version"] == 2 and set(meta["tied"]) == {"head", "head2"}
    back = load(path, base=TwoHeads)  # as written: the two heads compute from the one table again
    idx = torch.randint(0, 60, (3, 4))
    assert back.head.source is back.emb and back.head2.source is back.emb
    with torch.no_grad():
        assert torch.equal(back(idx), slim(idx))
    tensors = load_file(str(path))
    cases = [("head", {"kind": "tied_linear", "source": "nowhere", "bias": False}, "malformed entry"),
             ("head", {"kind": "tied_linear", "source": "emb", "bias": True}, "needs a bias 'head.bias'"),
             ("head", {"kind": "tied_linear", "source": "emb"}, "malformed entry"),
             ("head", {"kind": "eval", "source": "emb"}, "malformed entry"),
             ("", {"kind": "alias", "source": "emb"}, "malformed entry"),
             ("extra", {"kind": "alias", "source": "emb"}, "does not fit this base architecture")]  # no such module
    for name, bad, message in cases:
        meta = read_metadata(path)
        meta.pop("tensor_names")
        meta["tied"][name] = bad
        doctored = tmp_path / "doctored.safetensors"
        save_file(tensors, str(doctored), metadata={"compressor": json.dumps(meta)})
        with pytest.raises(CheckpointError, match=f"tied layer '{name}'.*{message}|{message}.*tied layer '{name}'"):
            load(doctored, base=TwoHeads)


def test_a_plan_is_a_frozen_value():
    from dataclasses import FrozenInstanceError

    model = Net().eval()
    the_plan = plan(model, FULL.plan_options())
    assert isinstance(the_plan.layers, tuple) and isinstance(the_plan.skipped, tuple)
    with pytest.raises(FrozenInstanceError):
        the_plan.layers[0].rank = 3
    with pytest.raises(FrozenInstanceError):
        the_plan.dense_params = 0
    applied = _apply(model, the_plan)
    with pytest.raises(FrozenInstanceError):
        applied.model = model
