"""Defects found by the trust review, each pinned by a test that failed before its fix."""

import math

import pytest
import tensorly as tl
import torch
from torch import nn

from builders import ScriptedLoader
from compressor import compress, export_program, load, save
from compressor.config import CompressConfig
from compressor.controller import SizeMeter, TargetController
from compressor.data import TensorLoader
from compressor.errors import DataError
from compressor.gates import BernoulliGate
from compressor.plan import count_params, planned_starts
from compressor.planner import plan
from compressor.surgery import apply
from compressor.layers import TNEmbedding, TNLinear
from compressor.selectors import get_selector


def test_decomposition_works_and_leaves_a_pytorch_tensorly_backend_alone():
    lin = nn.Linear(64, 32)
    tl.set_backend("pytorch")  # what tensorly-torch does on import
    try:
        layer = TNLinear.from_dense(lin, "tt", 64).eval()
        assert tl.get_backend() == "pytorch"
    finally:
        tl.set_backend("numpy")
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert (layer(x) - lin(x)).abs().max() < 1e-4  # full rank: the same layer


def test_a_generator_loader_is_refused_with_one_line(trained_digits_net, digits):
    xtr, ytr = digits[0], digits[1]
    batches = ((xtr[i:i + 64], ytr[i:i + 64]) for i in range(0, 640, 64))
    with pytest.raises(DataError, match="one-shot iterator .*re-iterable") as info:
        compress(trained_digits_net, batches, "tr", 4, epochs=1)
    assert "\n" not in str(info.value)


def _runs_dry(batches):
    """Re-iterable on paper, with a length, but empty after two passes (a hand-written loader bug)."""
    return ScriptedLoader(batches, lambda k, b: b if k <= 2 else [])


def test_a_loader_that_runs_dry_is_a_clear_error_not_a_hang(trained_digits_net, digits):
    xtr, ytr = digits[0], digits[1]
    loader = _runs_dry([(xtr[i:i + 64], ytr[i:i + 64]) for i in range(0, 640, 64)])
    with pytest.raises(DataError, match="no batch in epoch 2"):  # before: epoch after epoch, forever
        compress(trained_digits_net, loader, "tr", 4, epochs=3, lam=1.0)


def test_reinforce_give_back_reopens_for_real(trained_digits_net):
    config = CompressConfig(target=4, rank_select="reinforce", rank=16)
    selector = get_selector("reinforce")
    the_plan = plan(trained_digits_net, config.plan_options())
    gm = apply(trained_digits_net, the_plan, planned_starts(the_plan, config.decomp), sigma=config.sigma,
               seed=config.seed, make_gate=selector.gate_factory(config.selector_options())).model
    meter = SizeMeter(gm, the_plan.dense_params)
    assert isinstance(meter.gates()[0], BernoulliGate)
    target = 2 * meter.ratio()
    TargetController(meter, 2 * target, 100).force()
    before = meter.ratio()
    open_before = sum(g.open_count() for g in meter.gates())
    reopened = TargetController(meter, target, 100).give_back()
    assert reopened > 0
    assert sum(g.open_count() for g in meter.gates()) == open_before + reopened
    assert target <= meter.ratio() < before


def test_progress_ratio_counts_layers_that_went_back_to_dense(trained_digits_net, digits):
    xtr, ytr, xte, yte = digits
    events = []
    # fc2 (96 -> 10) at rank 64 is bigger than dense, so it goes back to dense when pruned.
    res = compress(trained_digits_net, TensorLoader(xtr, ytr, 64, shuffle=True), "tr", 3,
                   layer_ranks={"fc2": 64}, min_params=0, epochs=1, callback=events.append)
    assert any(l.name == "fc2" and l.kept_dense for l in res.report.layers)
    real = res.report.dense_params / count_params(res.model)
    assert res.report.epochs[-1]["ratio"] == pytest.approx(real)
    assert events[-1].kind == "end" and events[-1].ratio == pytest.approx(real)


def _embedding_with_padding():
    torch.manual_seed(0)
    emb = nn.Embedding(60, 12, padding_idx=3)
    with torch.no_grad():
        emb.weight[3] = torch.linspace(-1, 1, 12)  # a stored, non-zero padding row (e.g. loaded weights)
    return emb


def test_tn_embedding_refuses_out_of_range_indices_like_the_dense_layer():
    emb = _embedding_with_padding()
    layer = TNEmbedding.from_dense(emb, "tt", 64)
    for bad in (torch.tensor([[1, 60]]), torch.tensor([-1])):
        with pytest.raises(IndexError):
            emb(bad)
        with pytest.raises(IndexError):
            layer(bad)


def test_tn_embedding_returns_the_stored_padding_row():
    emb = _embedding_with_padding()
    layer = TNEmbedding.from_dense(emb, "tt", 64).eval()
    idx = torch.tensor([[3, 5, 3], [0, 59, 3]])
    with torch.no_grad():
        assert torch.equal(layer(idx)[idx == 3], emb(idx)[idx == 3])
        assert (layer(idx) - emb(idx)).abs().max() < 1e-5  # full rank elsewhere
        assert torch.equal(layer.prune_().to_dense().weight[3], emb.weight[3])


def test_slim_embedding_round_trips_through_a_checkpoint_and_export(tmp_path):
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = _embedding_with_padding()
            self.head = nn.Linear(12, 4)

        def forward(self, idx):
            return self.head(self.emb(idx).mean(1))

    model = Bag().eval()
    idx = torch.randint(0, 60, (64, 7))
    res = compress(model, TensorLoader(idx, None, 16), "tt", 1.3, min_params=0, epochs=1)
    back = load(save(res, tmp_path / "slim.safetensors"), base=Bag)
    program = torch.export.load(str(export_program(res.model, idx[:8], tmp_path / "slim.pt2"))).module()
    with torch.no_grad():
        ref = res.model(idx)
        assert torch.equal(back(idx), ref)
        assert (program(idx) - ref).abs().max() < 1e-5


# ------------------------------------------------------------------ outputs of a CLI run: all or nothing
@pytest.fixture
def model_file(trained_digits_net, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in trained_digits_net.state_dict().items()}, str(path))
    return path


def _run(model_file, *extra):
    from click.testing import CliRunner

    from compressor.cli import main

    args = [str(model_file), "--arch", "compressor.zoo:digits_net", "--data", "digits", "--target", "3x",
            "--epochs", "1", *map(str, extra)]
    return CliRunner().invoke(main, args)


def _one_error_line(result):
    assert result.exit_code == 2, result.output
    errors = [l for l in result.output.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert result.output.rstrip().endswith(errors[0])  # progress may come first; the error ends it
    return errors[0]


def test_report_json_never_overwrites_the_input_or_an_existing_file(model_file, tmp_path):
    before = model_file.read_bytes()
    assert "is the input model" in _one_error_line(_run(model_file, "-o", tmp_path / "s.safetensors",
                                                        "--report-json", model_file, "--force"))
    existing = tmp_path / "report.json"
    existing.write_text("keep me")
    assert "already exists" in _one_error_line(_run(model_file, "-o", tmp_path / "s.safetensors",
                                                    "--report-json", existing))
    same = tmp_path / "same.safetensors"
    assert "two outputs" in _one_error_line(_run(model_file, "-o", same, "--report-json", same))
    assert model_file.read_bytes() == before and existing.read_text() == "keep me"
    assert not (tmp_path / "s.safetensors").exists() and not same.exists()


def test_a_failure_after_training_writes_no_output_but_keeps_the_run(model_file, tmp_path, monkeypatch):
    import compressor.cli

    def broken_export(*args, **kwargs):
        raise RuntimeError("export backend exploded\nwith a long dump")

    monkeypatch.setattr(compressor.cli, "export_program", broken_export)
    out = tmp_path / "out" / "slim.safetensors"
    line = _one_error_line(_run(model_file, "-o", out, "--export-pt2", "--report-json", tmp_path / "out" / "r.json"))
    assert "could not export" in line and "export backend exploded" in line
    # no checkpoint, no report, no temporary file: only the trained run, kept for --resume and named
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["slim.resume.pt"]
    assert "slim.resume.pt" in line and "--resume" in line


def test_a_successful_run_writes_every_output(model_file, tmp_path):
    out = tmp_path / "slim.safetensors"
    result = _run(model_file, "-o", out, "--export-pt2", "--report-json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ratio"] >= 3 and out.exists() and out.with_suffix(".pt2").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# ------------------------------------------------------------------ the graph path skips what the module path skips
class SmallResNet(nn.Module):
    """BatchNorm, a residual, a depthwise (grouped) conv: what a small vision model looks like."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pointwise = nn.Conv2d(16, 32, 1)
        self.mix = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = h + torch.relu(self.depthwise(h))
        h = torch.relu(self.pointwise(h))
        h = h + torch.relu(self.mix(h))
        return self.head(h.mean((2, 3)))


def test_grouped_convs_are_skipped_with_the_same_reason_from_a_pt2(digits):
    torch.manual_seed(0)
    model = SmallResNet().eval()
    x = digits[0][:256]
    program = torch.export.export(model, (x[:4].clone(),), dynamic_shapes=({0: torch.export.Dim("b")},))
    config = CompressConfig(target=2, min_params=100)
    from_module = {s.name: s.reason for s in plan(model, config.plan_options()).skipped}
    from_graph = {s.name: s.reason for s in plan(program, config.plan_options()).skipped}
    assert "grouped convolution (groups=16)" in from_module["depthwise"]
    assert from_graph["depthwise"] == from_module["depthwise"]
    res = compress(program, TensorLoader(x, None, 64), "tr", 1.5, min_params=100, epochs=1)
    assert res.report.ratio >= 1.5 and any(s["name"] == "depthwise" for s in res.report.skipped)


# ------------------------------------------------------------------ a checkpoint loads onto either kind of base
def _program_of(model, x):
    return torch.export.export(model, (x[:4].clone(),), dynamic_shapes=({0: torch.export.Dim("b")},))


def test_a_checkpoint_from_a_module_loads_onto_its_pt2_and_back(trained_digits_net, digits, tmp_path):
    from compressor.zoo import DigitsNet

    xtr, ytr, xte = digits[0], digits[1], digits[2][:64]
    program = _program_of(trained_digits_net, xte)
    pt2 = tmp_path / "model.pt2"
    torch.export.save(program, str(pt2))
    for source in (trained_digits_net, program):
        res = compress(source, TensorLoader(xtr, ytr, 64, shuffle=True), "tr", 4, epochs=1)
        path = save(res, tmp_path / f"slim_{res.report.source}.safetensors")
        with torch.no_grad():
            ref = res.model(xte)
            for base in (DigitsNet, program, pt2):
                assert (load(path, base=base)(xte) - ref).abs().max() < 1e-5, (res.report.source, base)


def test_eval_with_a_pt2_base_for_a_module_checkpoint(trained_digits_net, digits, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import compressor.cli
    from compressor.cli import main
    from compressor.zoo import DigitsNet

    xtr, ytr, xte, yte = digits
    pt2 = tmp_path / "model.pt2"
    torch.export.save(_program_of(trained_digits_net, xte), str(pt2))
    res = compress(trained_digits_net, TensorLoader(xtr, ytr, 64, shuffle=True), "tr", 4, epochs=1)
    path = save(res, tmp_path / "slim.safetensors")
    monkeypatch.setattr(compressor.cli.out_console, "_width", 200)  # every table row on one line
    result = CliRunner().invoke(main, ["eval", str(path), "--data", "digits", "--base", str(pt2)])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    # What eval must print, computed here: the checkpoint loaded onto the module class (not the
    # .pt2), the original read back from the .pt2 file, on the digits split eval uses.
    slim, original = load(path, base=DigitsNet).eval(), torch.export.load(str(pt2)).module()
    with torch.no_grad():
        a, b = slim(xte), original(xte)
    assert torch.equal(b, trained_digits_net(xte))  # the file holds the original
    expected = {"accuracy (compressed)": f"{100 * float((a.argmax(-1) == yte).float().mean()):.2f}%",
                "accuracy (original)": f"{100 * float((b.argmax(-1) == yte).float().mean()):.2f}%",
                "top-1 agreement with original": f"{100 * float((a.argmax(-1) == b.argmax(-1)).float().mean()):.2f}%",
                "max |logit difference|": f"{float((a - b).abs().max()):.4f}"}
    shown = {label: _cell_after(label, result.output) for label in expected}
    assert shown == expected, result.output
    assert float(shown["max |logit difference|"]) > 0.01  # a 4x model differs: the comparison is not vacuous


def _cell_after(label, text):
    """The table cell printed right after ``label`` in rich output."""
    import re

    m = re.search(re.escape(label) + r"\s*│\s*(\S+)", text)
    assert m, f"{label!r} not in:\n{text}"
    return m.group(1)


# ------------------------------------------------------------------ shared and tied weights: never planned twice, never a crash
class TiedLM(nn.Module):
    """A tiny language model: embedding, a block, and an output head tied to the embedding."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.emb = nn.Embedding(100, 48)
        self.block = nn.Linear(48, 48)
        self.mix = nn.Linear(48, 48)
        self.lm_head = nn.Linear(48, 100, bias=False)
        if how == "identity":
            self.lm_head.weight = self.emb.weight

    def forward(self, idx):
        h = torch.tanh(self.block(self.emb(idx)))
        h = torch.tanh(self.block(h))  # the same Linear called twice
        h = torch.tanh(self.mix(h))
        if self.how == "functional":
            return torch.nn.functional.linear(h, self.emb.weight)
        return self.lm_head(h)


@pytest.mark.parametrize("how", ["identity", "functional"])
@pytest.mark.parametrize("as_program", [False, True])
def test_tied_and_reused_weights_are_planned_once_and_never_crash(how, as_program, tmp_path):
    torch.manual_seed(0)
    model = TiedLM(how).eval()
    idx = torch.randint(0, 100, (64, 6))
    source = (torch.export.export(model, (idx[:4],), dynamic_shapes=({0: torch.export.Dim("b")},))
              if as_program else model)
    config = CompressConfig(target=1.1, min_params=100)
    the_plan = plan(source, config.plan_options())
    sharers = [u for lp in the_plan.layers for u in lp.tied]
    names = [lp.name for lp in the_plan.layers] + sharers + [s.name for s in the_plan.skipped]
    assert len(names) == len(set(names))  # nothing planned or reported twice
    reasons = {s.name: s.reason for s in the_plan.skipped}
    if as_program:  # in a torch.export program a weight read by two calls stays dense (one name for both)
        tied = [n for n in ("emb", "lm_head") if n in reasons]
        assert tied and all("shared" in reasons[n] for n in tied)
    elif how == "identity":  # factorized once: the head computes from the embedding's cores
        assert sharers == ["lm_head"] and "emb" in {lp.name for lp in the_plan.layers}
    else:  # read by F.linear outside any layer: dense, and the unused head says so
        assert "shared" in reasons["emb"] and reasons["lm_head"].startswith("never called")
    res = compress(source, TensorLoader(idx, None, 16), "tr", 1.1, min_params=100, epochs=1)
    assert "mix" in {l.name for l in res.report.layers}
    slim = res.model
    with torch.no_grad():
        out = slim(idx)
        assert out.shape == (64, 6, 100)
        # TiedLM's forward written out from the compressed model's weights: the block applied
        # twice with the same weights, the head reading the embedding's (trained) table
        assert (out - _tied_lm_by_hand(slim, idx)).abs().max() < 1e-4
        assert (out - model(idx)).abs().max() > 1e-2  # the fine-tune moved it: the check is not vacuous
    back = load(save(res, tmp_path / "slim.safetensors"), base=source if as_program else (lambda: TiedLM(how)))
    with torch.no_grad():
        assert torch.equal(back(idx), out)
    if how == "identity":  # the tie survives loading: one table, read by both
        shared = ((back.lm_head.source, back.emb) if not as_program
                  else (back.get_submodule("lm_head").weight, back.get_submodule("emb").weight))
        assert shared[0] is shared[1]


def _tied_lm_by_hand(slim, idx):
    """TiedLM's forward from ``slim``'s layers: each called as a layer where it is one (factorized
    or dense), else (a torch.export program's parameter holder) its weight and bias applied."""

    def linear(name, h):
        m = slim.get_submodule(name)
        return m(h) if isinstance(m, (nn.Linear, TNLinear)) else nn.functional.linear(h, m.weight, m.bias)

    emb = slim.get_submodule("emb")
    table = emb(torch.arange(100)) if isinstance(emb, (nn.Embedding, TNEmbedding)) else emb.weight
    h = torch.tanh(linear("block", table[idx]))
    h = torch.tanh(linear("mix", torch.tanh(linear("block", h))))
    return nn.functional.linear(h, table)  # tied: the head's weight is the embedding's table


# ------------------------------------------------------------------ the ratio is the one on disk
def _file_elements(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


class NormedMLP(nn.Module):
    """BatchNorm buffers are saved too: they must count on both sides of the ratio."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.bn = nn.BatchNorm1d(256)
        self.fc2 = nn.Linear(256, 256)
        self.bn2 = nn.BatchNorm1d(256)
        self.fc3 = nn.Linear(256, 10)

    def forward(self, x):
        h = torch.relu(self.bn(self.fc1(x.flatten(1))))
        return self.fc3(torch.relu(self.bn2(self.fc2(h))))


def test_the_target_is_met_on_the_saved_checkpoint_buffers_included(digits, tmp_path):
    torch.manual_seed(0)
    model = NormedMLP().eval()
    xtr, ytr = digits[0], digits[1]
    res = compress(model, TensorLoader(xtr, ytr, 64, shuffle=True), "tr", 4, epochs=1)
    path = save(res, tmp_path / "slim.safetensors")
    dense = tmp_path / "dense.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dense))
    on_disk = _file_elements(dense) / _file_elements(path)
    assert on_disk >= 4.0 and res.report.ratio == pytest.approx(on_disk)
    assert res.report.param_ratio > res.report.ratio  # buffers stay dense, so parameters shrink more


def test_a_tied_weight_is_written_once_and_loads_back_tied(tmp_path):
    torch.manual_seed(0)
    model = TiedLM("identity").eval()
    idx = torch.randint(0, 100, (64, 6))
    res = compress(model, TensorLoader(idx, None, 16), "tr", 1.1, min_params=100, epochs=1)
    path = save(res, tmp_path / "slim.safetensors")
    assert res.report.params == _file_elements(path)  # the tied 100 x 48 table once
    back = load(path, base=lambda: TiedLM("identity"))
    assert back.lm_head.source is back.emb  # the head computes from the embedding's cores
    with torch.no_grad():
        assert torch.equal(back(idx), res.model(idx))
