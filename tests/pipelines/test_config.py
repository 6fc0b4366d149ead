"""Configs: YAML -> dataclasses, overrides, and clear errors naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.config import ConfigError, RunConfig, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    if "train" in yaml.safe_load(path.read_text()):  # pre-training configs have their own config class
        from pipelines.pretrain_config import PretrainRunConfig

        assert isinstance(load_config(path, cls=PretrainRunConfig), PretrainRunConfig)
        return
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig) and cfg.tasks


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny-bert\nfinetune:\n  epochs: 2\n")
    cfg = load_config(path, ["finetune.lr=3e-4", "data.max_length=64", "tasks=[rte, mrpc]"])
    assert cfg.model == "tiny-bert" and cfg.finetune.epochs == 2.0 and isinstance(cfg.finetune.epochs, float)
    assert cfg.finetune.lr == 3e-4 and cfg.data.max_length == 64 and cfg.tasks == ["rte", "mrpc"]
    assert cfg.data.source == "bundled"


@pytest.mark.parametrize("overrides,message", [
    (["finetune.epoch=2"], "unknown config key 'finetune.epoch'"),
    (["finetune.batch_size=big"], "finetune.batch_size: expected int, got str"),
    (["tasks=[sst3]"], "unknown task 'sst3'"),
    (["data.source=web"], "data.source='web'"),
    (["finetune.use_gpu=maybe"], "finetune.use_gpu"),
    (["finetune.pooling=max"], "finetune.pooling='max': use cls or mean"),
    (["data.source=dir"], "data.dir must be set"),
    (["finetune"], "expected key=value"),
    (["colour=red"], "unknown config key 'colour'"),
    (["finetune.epochs=.inf"], "finetune.epochs=inf: must be a finite number > 0"),
    (["finetune.warmup_ratio=7"], "finetune.warmup_ratio=7.0"),
    (["finetune.weight_decay=-3"], "finetune.weight_decay=-3.0"),
    (["finetune.log_every=0"], "finetune.log_every=0: must be >= 1"),
    (["mrem.lr=-1"], "mrem.lr=-1.0"),
    (["mrem.eval_samples=-1"], "mrem.eval_samples=-1: must be >= 1"),
    (["mrem.gpus_per_actor=0"], "mrem.gpus_per_actor=0.0: a share of one GPU in (0, 1]"),
    (["mrem.gpus_per_actor=1.5"], "mrem.gpus_per_actor=1.5: .* e.g. 0.5 puts two module actors on one GPU"),
    (["mrem.gpus_per_actor=0.33333"], "mrem.gpus_per_actor=0.33333: .* at most 4 decimals"),
    (["mrem.gpus_per_actor=.inf"], "mrem.gpus_per_actor=inf"),
    (["tasks=[sst2"], "--set 'tasks=[sst2': the value is not valid YAML"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, overrides)


def test_missing_config_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="finetune.batch_size"):
        load_config(None, ["finetune.batch_size=true"])


def test_malformed_yaml_file_is_a_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("tasks: [sst2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(path)


def test_model_limits_fail_before_work():
    from pipelines import models
    from pipelines.cluster import mrem_modules

    with pytest.raises(ConfigError, match="data.max_length=512: model tiny-bert has 128 positions"):
        models.check_max_length("tiny-bert", 512)
    models.check_max_length("tiny-bert", 128)
    with pytest.raises(ConfigError, match="no model config found"):
        models.check_max_length("/nonexistent/model-folder", 64)
    cfg = load_config(None, ["mrem.modules=7"])
    with pytest.raises(ConfigError, match="mrem.modules=7: the model has 6 layers"):
        mrem_modules(cfg.mrem, room=8, layers=6)
    assert mrem_modules(load_config(None).mrem, room=8, layers=6) == 6


KEYS = ["finetune.epochs", "finetune.lr", "finetune.batch_size", "finetune.warmup_ratio", "finetune.weight_decay",
        "finetune.log_every", "mrem.steps", "mrem.lr", "mrem.modules", "mrem.eval_samples", "mrem.quant",
        "rtn.calib_samples", "rtn.quant", "data.max_length", "data.train_examples", "prequant.budget_pct",
        "prequant.quant", "tasks", "model"]


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(KEYS), raw=st.one_of(
    st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.text(max_size=12), st.sampled_from(["[w4a8]", "[w17]", "[", "{a: 1}", "null", "true", "[sst2, x]", "w4g7a8"])))
def test_any_value_is_accepted_or_a_config_error(key, raw):
    """Whatever a user sets, the loader either accepts it or says what is wrong: never another exception."""
    try:
        load_config(None, [f"{key}={raw}"])
    except ConfigError as err:
        assert str(err)
