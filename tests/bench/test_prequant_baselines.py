"""bench/prequant.py compares every method at the same epochs: the recorded FP reference (and its RTN
figures) only stand in for fp_full when that model was fine-tuned with the bench config's settings."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from bench import prequant
from pipelines import run as run_mod
from pipelines.config import load_config
from pipelines.finetune import stage_key


@pytest.fixture
def reference(tmp_path, monkeypatch):
    """A recorded FP reference for mrpc whose checkpoint was fine-tuned with configs/prequant.yaml."""
    cfg = load_config(prequant.ROOT / "configs/prequant.yaml", ["tasks=[mrpc]"])
    model = tmp_path / "fp" / "model"
    model.mkdir(parents=True)
    key = stage_key("mrpc", cfg.model, cfg.data, cfg.finetune)
    (model / "plmq_meta.json").write_text(json.dumps({"config_key": key}))
    ref = tmp_path / "fp_reference.json"
    ref.write_text(json.dumps({"mrpc": {"f1": 86.38, "checkpoint": str(model), "wall_s": 1131.5}}))
    monkeypatch.setattr(prequant, "FP", ref)
    monkeypatch.setattr(prequant, "ROOT", tmp_path)  # checkpoint paths are relative to the repo
    ran = []
    monkeypatch.setattr(run_mod, "run_finetune_stage", lambda c, t, out: ran.append(c.finetune.epochs)
                        or SimpleNamespace(checkpoint="here", wall_s=5.0))
    monkeypatch.setattr(run_mod, "run_evaluate_stage", lambda *a: (SimpleNamespace(main=0.8, model_bytes=1), 1.0))
    return cfg, ran


def test_the_reference_stands_in_when_trained_like_the_bench(reference, tmp_path):
    cfg, ran = reference
    metric, checkpoint, info = prequant.fp_baseline(cfg, "mrpc", tmp_path)
    assert (metric, ran) == (86.38, []) and info["source"] != "run"
    assert (info["lr"], info["epochs"]) == (cfg.finetune.lr, 3)  # each figure says how it was trained


def test_more_epochs_fine_tune_fp_here(reference, tmp_path):
    cfg, ran = reference
    cfg.finetune.epochs = 6
    metric, checkpoint, info = prequant.fp_baseline(cfg, "mrpc", tmp_path)
    assert (metric, checkpoint, ran, info["source"], info["epochs"]) == (80.0, "here", [6], "run", 6)
