"""Configs: YAML -> dataclasses, overrides, and clear errors naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import ConfigError, RunConfig, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    if path.name.startswith("pretrain"):  # the pre-training stage has its own config class
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
    (["tasks=[sst3]"], "unknown GLUE task 'sst3'"),
    (["data.source=web"], "data.source='web'"),
    (["finetune.use_gpu=maybe"], "finetune.use_gpu"),
    (["finetune.pooling=max"], "finetune.pooling='max': use cls or mean"),
    (["data.source=dir"], "data.dir must be set"),
    (["finetune"], "expected key=value"),
    (["colour=red"], "unknown config key 'colour'"),
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
