"""Every config composes; +triton flags land in model.kernels; typos fail with the key named."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from hstu.config import check_data_targets, config_errors
from hstu.model.recommender import ENCODER_TARGETS
from hstu_kernels import OPERATORS, TritonOperatorManager
from hstu_kernels.time_buckets import MAX_NUM_BUCKETS, bucket_thresholds

CONF = Path(__file__).resolve().parents[1] / "conf"


def _compose(*overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("train", overrides=list(overrides))


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_defaults_have_no_triton_entry_and_flags_are_off():
    cfg = _compose()
    assert dict(cfg.model.kernels) == {op: False for op in OPERATORS}
    assert "triton" not in OmegaConf.to_container(OmegaConf.load(CONF / "train.yaml"))["defaults"][0]


@pytest.mark.parametrize("option", _options("triton"))
def test_triton_options(option):
    cfg = _compose(f"+triton={option}")
    flags = dict(cfg.model.kernels)
    if option == "all":
        assert all(flags.values())
    elif option == "none":
        assert not any(flags.values())
    else:
        assert flags == {op: op == option for op in OPERATORS}


@pytest.mark.parametrize("model", _options("model"))
def test_every_model_pulls_in_the_flag_schema(model):
    cfg = _compose(f"model={model}", "+triton=all")
    assert all(cfg.model.kernels.values())
    assert cfg.model.encoder._target_.startswith("hstu.model.")


@pytest.mark.parametrize("group", ["data", "trainer", "callbacks", "logger", "experiment"])
def test_every_group_option_composes(group):
    for option in _options(group):
        overrides = [f"{group}={option}"] if group != "experiment" else [f"experiment={option}"]
        if group == "data" and option in ("ml-20m", "amzn-books", "interactions"):
            overrides.append("data.source.path=/tmp/x.csv")
        cfg = _compose(*overrides)
        OmegaConf.to_container(cfg.model, resolve=True)
        assert config_errors(cfg) == [], overrides  # every shipped option passes the checks


def test_triton_typo_fails_naming_the_option():
    with pytest.raises(MissingConfigException, match="triton/hstu_attn"):
        _compose("+triton=hstu_attn")


def test_unknown_flag_key_fails_naming_the_key():
    with pytest.raises(ConfigCompositionException, match="hstu_attn"):
        _compose("model.kernels.hstu_attn=true")
    # Hydra's `+key=value` opens the node for appending, so the schema cannot stop it at composition;
    # the check before anything is built does, and so would the model build, each naming the key.
    cfg = _compose("+model.kernels.hstu_attn=true")
    assert config_errors(cfg) == [f"model.kernels.hstu_attn: unknown key; model.kernels has {sorted(OPERATORS)}"]
    with pytest.raises(KeyError, match="hstu_attn"):
        TritonOperatorManager(cfg.model.kernels)


@pytest.mark.parametrize("value", ["maybe", "2", "1", "yes", "on"])
def test_non_boolean_flag_fails_naming_key_and_reason(value):
    """OmegaConf's own booleans read 1, 2, yes and on as true; the flags take only true and false."""
    with pytest.raises(ConfigCompositionException, match=f"model.kernels.interaction={value}") as info:
        _compose(f"model.kernels.interaction={value}")
    assert "is not a boolean" in str(info.value.__cause__)
    assert _compose("model.kernels.interaction=true").model.kernels.interaction is True


@pytest.mark.parametrize("data", _options("data"))
def test_every_data_option_is_loadable_back_from_a_file(data):
    """Evaluation, export and serving rebuild the data from a saved config, which may name only
    DATA_TARGETS: every data option of the tree passes that check."""
    check_data_targets(OmegaConf.to_container(_compose(f"data={data}").data), f"data={data}")


@pytest.mark.parametrize("model", _options("model"))
def test_every_model_option_names_a_buildable_encoder(model):
    assert _compose(f"model={model}").model.encoder._target_ in ENCODER_TARGETS


@pytest.mark.parametrize("override, rule", [
    ("trainer.max_epochs=0", "trains nothing (the run would test untrained weights); use >= 1, or -1 for no limit"),
    ("+trainer.max_steps=0", "trains nothing (the run would test untrained weights); use >= 1, or -1 for no limit"),
    ("+trainer.limit_train_batches=0", "trains nothing (the run would test untrained weights); use a batch count "
                                       ">= 1 or a fraction in (0, 1]"),
    ("+trainer.limit_train_batches=0.0", "trains nothing (the run would test untrained weights); use a batch count "
                                         ">= 1 or a fraction in (0, 1]"),
    ("+trainer.limit_val_batches=0", "validates nothing, and the run selects its best checkpoint on validation; use "
                                     "a batch count >= 1 or a fraction in (0, 1]"),
])
def test_a_run_that_would_train_or_validate_nothing_is_refused(override, rule):
    """Else it would report test metrics of untrained weights, or die after an epoch in early stopping."""
    assert config_errors(_compose(override)) == [f"{override.lstrip('+')}: {rule}"]
    assert config_errors(_compose("trainer.max_epochs=-1", "+trainer.limit_val_batches=0.5")) == []


def test_num_time_buckets_is_checked_against_what_the_bucketing_takes():
    """Above the maximum a threshold overflows int64 and the first forward would fail."""
    assert len(bucket_thresholds(MAX_NUM_BUCKETS)) == MAX_NUM_BUCKETS - 1
    with pytest.raises(ValueError, match="overflows int64"):
        bucket_thresholds(MAX_NUM_BUCKETS + 1)
    rule = f"must lie in [1, {MAX_NUM_BUCKETS}] (the bucket thresholds in seconds must fit int64)"
    for value in (0, MAX_NUM_BUCKETS + 1, 1000):
        assert config_errors(_compose(f"model.encoder.num_time_buckets={value}")) == [
            f"model.encoder.num_time_buckets={value}: {rule}"]
    assert config_errors(_compose(f"model.encoder.num_time_buckets={MAX_NUM_BUCKETS}")) == []


def test_a_data_window_other_than_the_models_is_refused():
    """data.max_seq_len follows model.max_seq_len; set above it, training failed at the first long batch."""
    assert config_errors(_compose("model.max_seq_len=8", "data.max_seq_len=20")) == [
        "data.max_seq_len=20: must equal model.max_seq_len=8, the window the model is trained, evaluated and served "
        "on (unset, data.max_seq_len follows model.max_seq_len)"]
    # below it, evaluation saw windows of 6 events and serving windows of 8: every served answer differed
    assert config_errors(_compose("model.max_seq_len=8", "data.max_seq_len=6")) == [
        "data.max_seq_len=6: must equal model.max_seq_len=8, the window the model is trained, evaluated and served "
        "on (unset, data.max_seq_len follows model.max_seq_len)"]
    assert config_errors(_compose("model.max_seq_len=8", "data.max_seq_len=8")) == []
    assert config_errors(_compose("model.max_seq_len=8")) == []
