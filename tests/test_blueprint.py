"""A slim model's blueprint is a value: ``compress`` returns it, ``save`` writes it, and a model
that never had one (rebuilt by ``load``, or its layers moved into a new module) is saved
correctly all the same; nothing is ever stored on the model."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

from compressor import Blueprint, compress, load, read_blueprint, read_metadata, save
from compressor.blueprint import blueprint_of
from compressor.data import TensorLoader
from compressor.errors import CheckpointError
from compressor.plan import count_state
from compressor.surgery import tn_layers
from compressor.layers import TiedTNLinear, TNEmbedding
from compressor.zoo import DigitsNet


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def module_run(trained_digits_net, digits):
    xtr, ytr = digits[0], digits[1]
    return compress(trained_digits_net, TensorLoader(xtr, ytr, 64, shuffle=True, seed=0), "tr", 4, epochs=1, seed=0)


@pytest.fixture(scope="module")
def graph_run(trained_digits_net, digits):
    xtr, ytr, xte = digits[0], digits[1], digits[2]
    program = torch.export.export(trained_digits_net, (xte[:4].clone(),),
                                  dynamic_shapes=({0: torch.export.Dim("b")},))
    res = compress(program, TensorLoader(xtr, ytr, 64, shuffle=True, seed=0), "tr", 4, epochs=1, seed=0)
    return program, res


def test_compress_returns_the_blueprint_save_writes(module_run, digits, tmp_path):
    res, xte = module_run, digits[2]
    bp = res.blueprint
    assert bp == Blueprint("module", res.report.dense_params, (), "tr", 4.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        bp.dense_params = 1
    path = save(res, tmp_path / "slim.safetensors")
    meta = read_metadata(path)
    assert (meta["source"], meta["dense_params"], meta["params"]) == ("module", bp.dense_params, res.report.params)
    assert meta["ratio"] == res.report.ratio
    assert meta["extra"] == {"decomp": "tr", "target": 4.0}
    assert read_blueprint(path) == bp
    assert torch.equal(_logits(load(path, base=DigitsNet), xte), _logits(res.model, xte))


def test_a_module_tells_its_own_blueprint_with_the_dense_size_compress_counted(module_run):
    derived = blueprint_of(module_run.model)
    assert derived == dataclasses.replace(module_run.blueprint, target=None)  # only the run's target is unknown
    assert derived.dense_params == count_state(DigitsNet())


def test_a_model_rebuilt_by_load_saves_again_with_the_same_description(module_run, digits, tmp_path):
    res, xte = module_run, digits[2]
    first = save(res, tmp_path / "first.safetensors")
    rebuilt = load(first, base=DigitsNet)
    again = save(rebuilt, tmp_path / "again.safetensors")  # no blueprint: the model tells it
    meta, meta_again = read_metadata(first), read_metadata(again)
    assert meta_again["ratio"] == meta["ratio"] == res.report.ratio
    assert meta_again["layers"] == meta["layers"] and meta_again["dense_params"] == meta["dense_params"]
    assert torch.equal(_logits(load(again, base=DigitsNet), xte), _logits(res.model, xte))
    # With the file's own blueprint, the description is written back whole (run's target included).
    same = save(rebuilt, tmp_path / "same.safetensors", blueprint=read_blueprint(first))
    assert read_metadata(same) == meta


@pytest.mark.parametrize("wrap", [torch.compile, nn.DataParallel], ids=["torch.compile", "DataParallel"])
def test_a_wrapped_slim_model_saves_as_the_model_inside(module_run, digits, tmp_path, wrap):
    res, xte = module_run, digits[2]
    plain = save(res.model, tmp_path / "plain.safetensors")
    # A copy: torch.compile marks the module it wraps. Saved without "_orig_mod." / "module." prefixes.
    wrapped = save(wrap(copy.deepcopy(res.model)), tmp_path / "wrapped.safetensors")
    assert read_metadata(wrapped) == read_metadata(plain)
    assert torch.equal(_logits(load(wrapped, base=DigitsNet), xte), _logits(res.model, xte))


def test_slim_layers_moved_into_a_new_module_save_and_load_onto_a_matching_base(digits, tmp_path):
    xtr, ytr, xte, _ = digits
    x, x_test = xtr.flatten(1), xte.flatten(1)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    res = compress(mlp, TensorLoader(x, ytr, 64, shuffle=True, seed=0), "tt", 3, epochs=1, seed=0)
    assert tn_layers(res.model)
    moved = nn.Sequential(*res.model.children())  # a new container: no trace of the run
    path = save(moved, tmp_path / "moved.safetensors")
    meta = read_metadata(path)
    assert meta["dense_params"] == res.report.dense_params and meta["ratio"] == res.report.ratio
    fresh = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    assert torch.equal(_logits(load(path, base=fresh), x_test), _logits(res.model, x_test))


class TiedBag(nn.Module):
    """A padded embedding whose table is also the (biased) output head, and a BatchNorm's buffers:
    every way a slim model's state differs from the dense one's in size."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(96, 16, padding_idx=0)
        self.norm = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 96)
        self.head.weight = self.embed.weight

    def forward(self, idx):
        return self.head(self.norm(self.embed(idx).mean(1)))


def test_the_derived_dense_size_counts_ties_padding_rows_and_buffers_as_compress_does(tmp_path):
    model = TiedBag().eval()
    idx = torch.randint(0, 96, (128, 6))
    res = compress(model, TensorLoader(idx, None, 32), "tt", 1.5, min_params=0, epochs=1, seed=0)
    assert isinstance(res.model.embed, TNEmbedding) and isinstance(res.model.head, TiedTNLinear)
    assert blueprint_of(res.model).dense_params == res.blueprint.dense_params == count_state(model)
    path = save(res.model, tmp_path / "tied.safetensors")
    assert read_metadata(path)["ratio"] == res.report.ratio
    assert torch.equal(_logits(load(path, base=TiedBag), idx), _logits(res.model, idx))


def test_a_graph_model_saves_with_its_blueprint_and_says_how_without_it(graph_run, digits, tmp_path):
    program, res = graph_run
    xte = digits[2]
    assert res.report.source == "graph" and res.blueprint.sites
    from_result = save(res, tmp_path / "result.safetensors")
    explicit = save(res.model, tmp_path / "explicit.safetensors", blueprint=res.blueprint)
    assert read_metadata(from_result) == read_metadata(explicit)
    assert read_metadata(from_result)["ratio"] == res.report.ratio
    for path in (from_result, explicit):
        assert torch.equal(_logits(load(path, base=program), xte), _logits(res.model, xte))
    with pytest.raises(CheckpointError, match=r"pass save\(\.\.\., blueprint=") as info:
        save(res.model, tmp_path / "bare.safetensors")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "bare.safetensors").exists()


def test_a_loaded_graph_model_saves_again_with_the_files_blueprint(graph_run, digits, tmp_path):
    program, res = graph_run
    xte = digits[2]
    first = save(res, tmp_path / "first.safetensors")
    back = load(first, base=program)
    with pytest.raises(CheckpointError, match="read_blueprint"):
        save(back, tmp_path / "bare.safetensors")
    again = save(back, tmp_path / "again.safetensors", blueprint=read_blueprint(first))
    assert read_metadata(again) == read_metadata(first)
    assert torch.equal(_logits(load(again, base=program), xte), _logits(res.model, xte))


def test_nothing_is_stored_on_a_slim_model(module_run, graph_run, trained_digits_net, tmp_path):
    res = module_run
    keys = set(vars(res.model))
    assert keys == set(vars(trained_digits_net)) == set(vars(DigitsNet()))
    path = save(res, tmp_path / "slim.safetensors")
    assert set(vars(res.model)) == keys  # saving leaves nothing behind either
    assert set(vars(load(path, base=DigitsNet))) == keys
    _, graph_res = graph_run
    graph_keys = set(vars(graph_res.model))
    save(graph_res, tmp_path / "graph.safetensors")
    assert set(vars(graph_res.model)) == graph_keys
    for model in (res.model, graph_res.model):
        assert not [name for name in vars(model) if "compressor" in name or "slim" in name]


def test_save_refuses_what_is_neither_a_model_nor_a_result(tmp_path):
    with pytest.raises(CheckpointError, match="save takes what compress returned or a slim nn.Module"):
        save({"fc1.weight": torch.zeros(2, 2)}, tmp_path / "x.safetensors")
