"""The model pass: planning and applying mutate nothing they are given, and say where layers went."""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from compressor import compress, load, save
from compressor.config import CompressConfig
from compressor.data import TensorLoader
from compressor.graph import Site, apply, plan, tn_layers


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
    the_plan = plan(model, config)  # fx sees head (a Linear); block's F.linear is not a module call
    before_plan, before_state = copy.deepcopy(the_plan), copy.deepcopy(model.state_dict())
    applied = apply(model, the_plan, config)
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
    the_plan = plan(program, config)
    names = [lp.name for lp in the_plan.layers]
    assert "block" in names
    applied = apply(program, the_plan, config)
    assert [lp.name for lp in the_plan.layers] == names  # the plan is never renamed
    assert applied.sites["block"] == Site("block_tn", "block.weight", None)
    assert applied.homeless == {"block_tn"}
    with torch.no_grad():  # full-rank TT-SVD: the factorized graph computes what the original did
        assert (applied.model(x) - model(x)).abs().max() < 1e-4

    res = compress(program, TensorLoader(x, None, 64), "tt", 1.5, min_params=0, epochs=1)
    assert "block_tn" in {l.name for l in res.report.layers}
    path = save(res.model, tmp_path / "slim.safetensors")
    back = load(path, base=program)
    with torch.no_grad():
        assert torch.equal(back(x), res.model(x))
