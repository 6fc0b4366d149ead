"""Typed run configuration: YAML -> dataclasses, with `key=value` overrides.

Every stage has one config dataclass; `RunConfig` groups them. Unknown keys and
values of the wrong type are rejected with the dotted key in the message, so a
typo in a YAML file fails before any work starts.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key."""


@dataclass
class DataConfig:
    source: str = "bundled"          # bundled | dir | hub
    dir: str | None = None           # glue_data/-style folder when source == "dir"
    max_length: int = 128
    train_examples: int | None = None  # first N (shuffled with seed) training rows; None = all
    eval_examples: int | None = None   # first N dev rows; None = all
    cache_dir: str | None = None       # tokenized Arrow cache; default ~/.cache/plmq

    def validate(self) -> None:
        if self.source not in ("bundled", "dir", "hub"):
            raise ConfigError(f"data.source={self.source!r}: use one of bundled, dir, hub")
        if self.source == "dir" and not self.dir:
            raise ConfigError("data.dir must be set when data.source is 'dir'")
        if self.max_length < 8:
            raise ConfigError(f"data.max_length={self.max_length}: must be >= 8")
        for name in ("train_examples", "eval_examples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"data.{name}={value}: must be positive or null")


@dataclass
class FinetuneConfig:
    epochs: float = 3.0
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    seed: int = 42
    num_workers: int = 1             # Ray Train data-parallel workers
    use_gpu: str = "auto"            # auto | true | false
    cpus_per_worker: int = 1
    log_every: int = 20

    def validate(self) -> None:
        if self.epochs <= 0:
            raise ConfigError(f"finetune.epochs={self.epochs}: must be > 0")
        if self.batch_size <= 0 or self.num_workers <= 0 or self.cpus_per_worker <= 0:
            raise ConfigError("finetune.batch_size, num_workers and cpus_per_worker must be >= 1")
        if not 0 < self.lr < 1:
            raise ConfigError(f"finetune.lr={self.lr}: expected a small positive number such as 5e-5")
        if self.use_gpu not in ("auto", "true", "false"):
            raise ConfigError(f"finetune.use_gpu={self.use_gpu!r}: use auto, true or false")


@dataclass
class EvaluateConfig:
    batch_size: int = 128

    def validate(self) -> None:
        if self.batch_size <= 0:
            raise ConfigError(f"evaluate.batch_size={self.batch_size}: must be >= 1")


@dataclass
class RunConfig:
    model: str = "minilm-l6"
    tasks: list[str] = field(default_factory=lambda: ["sst2"])
    output_dir: str = "runs/default"
    experiment: str | None = None    # MLflow experiment; default plmq-<model>
    data: DataConfig = field(default_factory=DataConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def validate(self) -> None:
        from pipelines.data import check_task  # local import: data imports config

        if not self.tasks:
            raise ConfigError("tasks must list at least one GLUE task")
        for task in self.tasks:
            check_task(task)
        for section in (self.data, self.finetune, self.evaluate):
            section.validate()

    @property
    def experiment_name(self) -> str:
        return self.experiment or f"plmq-{self.model.replace('/', '-')}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is Any or (isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and bad types."""
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown config key {key!r}; known keys here: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is not a section")
    node[keys[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings; values are parsed as YAML scalars/lists."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. finetune.epochs=1")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                cls: type = RunConfig) -> Any:
    """Read a YAML config (or defaults), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
    apply_overrides(data, overrides or [])
    cfg = from_dict(cls, data)
    cfg.validate()
    return cfg
