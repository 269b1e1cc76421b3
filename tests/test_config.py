"""CompressConfig documents and validates itself from its field metadata."""

from dataclasses import fields, replace

import pytest

from compressor.config import CompressConfig
from compressor.selectors import RankSelector, selector_names
from compressor.errors import ConfigError, TargetError


def test_every_field_has_help():
    for f in fields(CompressConfig):
        assert isinstance(f.metadata.get("help"), str) and f.metadata["help"].strip(), f.name


def test_defaults_are_valid_and_target_is_parsed():
    config = CompressConfig(target="5X")
    assert config.target == 5.0 and config.decomp == "tr" and config.rank_select == "l0"
    assert replace(config, target="10x").target == 10.0  # replace() validates again


def test_choices_come_from_one_place():
    for name in selector_names():
        assert CompressConfig(rank_select=name).rank_select == name
    choices = {f.name: f.metadata.get("choices") for f in fields(CompressConfig)}
    assert list(choices["rank_select"]) == list(RankSelector.registry)  # a live view of the registry


@pytest.mark.parametrize("kwargs,message", [
    (dict(decomp="cp"), "unknown decomposition 'cp'"),
    (dict(rank_select="magic"), "unknown rank selector 'magic'"),
    (dict(penalty="area"), "unknown penalty 'area'"),
    (dict(distill_loss="l1"), "unknown distillation loss 'l1'"),
    (dict(rank=0), "rank must be a positive integer"),
    (dict(rank=2.5), "rank must be a positive integer"),
    (dict(sigma=0), "sigma must be a number > 0"),
    (dict(sigma=float("inf")), "sigma must be a number > 0"),
    (dict(lam=-1.0), "lambda must be >= 0"),
    (dict(lam=float("nan")), "lambda must be >= 0"),
    (dict(epochs=-1), "epochs must be a non-negative integer"),
    (dict(epochs=True), "epochs must be a non-negative integer"),
    (dict(max_steps=0), "max_steps must be a positive integer"),
    (dict(gate_fraction=0.0), r"gate_fraction must be in \(0, 1\]"),
    (dict(gate_fraction=1.5), r"gate_fraction must be in \(0, 1\]"),
    (dict(lr=-1e-3), "lr must be a number > 0"),
    (dict(gate_lr=0), "gate_lr must be a number > 0"),
    (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
    (dict(distill=-1.0), "distill weight must be >= 0"),
    (dict(temperature=0), "temperature must be a number > 0"),
    (dict(min_params=-1), "min_params must be >= 0"),
    (dict(filter_fn="fc1"), "filter_fn must be callable"),
    (dict(layer_ranks={"fc1": 0}), r"layer_ranks\['fc1'\] must be positive integers"),
    (dict(layer_ranks={"fc1": []}), r"layer_ranks\['fc1'\] must be positive integers"),
    (dict(reinforce_samples=0), "reinforce_samples must be a positive integer"),
    (dict(log_every=0), "log_every must be a positive integer"),
    (dict(time_budget="soon"), "time budget 'soon' is not a duration"),
    (dict(time_budget=0), "time budget must be a number > 0"),
    (dict(early_stop_patience=0), "early-stop patience must be a positive integer"),
    (dict(early_stop_min_delta=1.0), r"early-stop min delta must be in \[0, 1\)"),
])
def test_invalid_values_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        CompressConfig(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("target", ["abc", "1x", 0.5, float("inf"), True])
def test_invalid_target_raises_target_error(target):
    with pytest.raises(TargetError):
        CompressConfig(target=target)


def test_none_means_the_tool_chooses():
    config = CompressConfig(rank=None, lam=None, epochs=None, max_steps=None, lr=None, filter_fn=None)
    assert config.rank is None and config.lr is None
    # None reaches what reads it, and survives a copy through the config's own fields
    assert config.plan_options().rank is None and config.selector_options().rank is None
    from dataclasses import fields
    again = CompressConfig(**{f.name: getattr(config, f.name) for f in fields(config)})
    assert again == config and again.rank is None and again.plan_options() == config.plan_options()
    assert CompressConfig(rank=8).plan_options().rank == 8 and CompressConfig(rank=8).selector_options().rank == 8
    assert CompressConfig(epochs=0, lam=0.0, rank=8, layer_ranks={"fc1": [4, 6]}).epochs == 0
