"""Every batch a run reads is held to the first one's conventions, and every option is checked once.

Before, only the first batch was looked at: a later batch with a wrong label count, a label out
of range, no labels (or labels where the first had none), no example at all, or a loader whose
passes shrink ended in a raw exception, a "try a lower learning rate" or silence. Each is now
one ``DataError`` line naming the batch; a bad option is one ``ConfigError`` line naming it.
"""

import pytest
from click.testing import CliRunner
from safetensors.torch import save_file

from builders import ScriptedLoader
from compressor import compress, evaluate
from compressor.cli import main
from compressor.config import CompressConfig
from compressor.errors import ConfigError, DataError

RUN = dict(epochs=1, lam=1.0)


@pytest.fixture
def batches(digits):
    """Ten labelled batches of 64 digits."""
    xtr, ytr = digits[0], digits[1]
    return [(xtr[i:i + 64], ytr[i:i + 64]) for i in range(0, 640, 64)]


def _with(batches, index, batch):
    changed = list(batches)
    changed[index] = batch
    return changed


def _one_line(info, *fragments):
    text = str(info.value)
    assert "\n" not in text, text
    for fragment in fragments:
        assert fragment in text, text


def test_a_later_batch_with_the_wrong_label_count_is_named(trained_digits_net, batches):
    x, y = batches[3]
    with pytest.raises(DataError) as info:  # before: ValueError from cross_entropy
        compress(trained_digits_net, _with(batches, 3, (x, y[:-1])), "tr", 4, **RUN)
    _one_line(info, "batch 4 of epoch 1", "labels of shape (63,) for outputs (64, 10)")


def test_a_later_label_out_of_range_is_named(trained_digits_net, batches):
    x, y = batches[6]
    with pytest.raises(DataError) as info:  # before: IndexError "Target 25 is out of bounds"
        compress(trained_digits_net, _with(batches, 6, (x, y + 15)), "tr", 4, **RUN)
    _one_line(info, "batch 7 of epoch 1", "out of range for a model with 10 outputs")
    y = y.clone()
    y[0] = -3  # negative, and not the ignore index -100
    with pytest.raises(DataError) as info:
        compress(trained_digits_net, _with(batches, 2, (x, y)), "tr", 4, **RUN)
    _one_line(info, "batch 3 of epoch 1", "label -3 is out of range")


def test_labelled_and_unlabelled_batches_cannot_mix(trained_digits_net, batches):
    with pytest.raises(DataError) as info:  # before: AttributeError 'NoneType' object has no attribute 'out'
        compress(trained_digits_net, _with(batches, 3, batches[3][0]), "tr", 4, **RUN)
    _one_line(info, "batch 4 of epoch 1", "no labels but the first batch had labels")
    inputs_only = [x for x, _ in batches]
    with pytest.raises(DataError) as info:  # before: those batches silently trained on cross-entropy
        compress(trained_digits_net, _with(inputs_only, 5, batches[5]), "tr", 4, **RUN)
    _one_line(info, "batch 6 of epoch 1", "has labels but the first batch had inputs alone")


def test_an_empty_batch_is_named_not_blamed_on_the_learning_rate(trained_digits_net, batches):
    x, y = batches[3]
    with pytest.raises(DataError) as info:  # before: "the loss became nan ... try a lower learning rate"
        compress(trained_digits_net, _with(batches, 3, (x[:0], y[:0])), "tr", 4, **RUN)
    _one_line(info, "batch 4 of epoch 1", "is empty")
    with pytest.raises(DataError) as info:  # the first batch too
        compress(trained_digits_net, _with(batches, 0, x[:0]), "tr", 4, **RUN)
    _one_line(info, "(0, 1, 8, 8) is empty")


def _shrinking(batches):
    """Says ten batches, and gives one fewer every pass (a hand-written loader bug)."""
    return ScriptedLoader(batches, lambda k, b: b[:len(b) + 1 - k])


def test_a_loader_that_yields_fewer_batches_each_pass_is_refused(trained_digits_net, batches):
    with pytest.raises(DataError) as info:  # before: silently more, shorter epochs
        compress(trained_digits_net, _shrinking(batches), "tr", 4, **RUN)
    _one_line(info, "yielded 9 batches in epoch 1 but 10 per pass")


def test_a_bad_evaluation_batch_is_named(trained_digits_net, batches):
    x, y = batches[2]
    with pytest.raises(DataError) as info:  # before: a silently wrong accuracy
        evaluate(trained_digits_net, _with(batches, 2, (x, y + 10)))
    _one_line(info, "evaluation batch 3", "label")
    with pytest.raises(DataError) as info:  # before: ZeroDivisionError-free but silently counted as wrong
        evaluate(trained_digits_net, _with(batches, 1, (x, y[:10])))
    _one_line(info, "evaluation batch 2", "labels of shape (10,)")


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(weight_decay=float("nan")), "weight_decay must be >= 0 and finite, got nan"),
    (dict(weight_decay="abc"), "weight_decay must be >= 0"),
    (dict(sigma=1e300), "sigma must be at most 10"),
    (dict(seed=2 ** 80), "seed must be an integer from 0 to 2**63 - 1"),
    (dict(seed="abc"), "seed must be an integer"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(device="meta"), "cannot run a model"),
    (dict(gate_fraction="half"), "gate_fraction must be in (0, 1]"),
])
def test_bad_options_are_one_config_error_naming_the_option(kwargs, fragment):
    with pytest.raises(ConfigError) as info:
        CompressConfig(**kwargs)
    _one_line(info, fragment)


@pytest.mark.parametrize("extra, fragment", [
    (["--seed", str(2 ** 80)], "seed must be an integer from 0 to 2**63 - 1"),
    (["--sigma", "1e300"], "sigma must be at most 10"),
    (["--device", "meta"], "cannot run a model"),
])
def test_bad_options_on_the_command_line_are_one_error_line(tmp_path, extra, fragment):
    out = tmp_path / "o.safetensors"
    r = CliRunner().invoke(main, [str(tmp_path / "model.pt"), "--target", "4x", "--data", "digits", "-o", str(out)]
                           + extra)
    assert r.exit_code == 2 and "Traceback" not in r.output + r.stderr, (r.exit_code, r.output, r.stderr)
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and fragment in r.stderr, r.stderr
    assert not out.exists()


def test_a_label_out_of_range_deep_in_a_data_file_is_one_error_line(trained_digits_net, digits, tmp_path):
    """The CLI's own loader: the bad label sits in a batch the first-batch check never sees."""
    xtr, ytr = digits[0][:640], digits[1][:640].clone()
    ytr[600] = 10  # the model has 10 outputs: 0..9
    data, model, out = tmp_path / "data.safetensors", tmp_path / "model.pt", tmp_path / "o.safetensors"
    save_file({"inputs": xtr.contiguous(), "labels": ytr.contiguous()}, str(data))
    save_file({k: v.contiguous() for k, v in trained_digits_net.state_dict().items()}, str(model))
    r = CliRunner().invoke(main, [str(model), "--arch", "compressor.zoo:digits_net", "--target", "4x", "--data",
                                  str(data), "--epochs", "1", "--batch-size", "64", "-o", str(out)])
    assert r.exit_code == 2 and "Traceback" not in r.output + r.stderr, (r.exit_code, r.output, r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert errors == ["error: batch 4 of epoch 1: label 10 is out of range for a model with 10 outputs"], r.stderr
    assert not out.exists()
