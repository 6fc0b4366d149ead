"""Stage `mrem-e2e`: planning after MREM, and a tuned model whose codes are MREM's and whose steps moved."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from pipelines import checkpoints
from pipelines.config import E2eConfig, MremConfig
from pipelines.stages import mrem, mrem_e2e, plan
from pipelines.stages.base import Context
from quant import quant_modules
from tests.pipelines.test_mrem import calibrated, run_mrem, small


def test_planned_after_each_mrem_stage_only_when_enabled():
    cfg = small(quant=["w4a8", "w2a8"])
    assert mrem_e2e.plan(cfg) == []
    cfg.mrem.e2e.enabled = True
    assert [(s.name, s.deps) for s in mrem_e2e.plan(cfg)] == [
        ("mrem-e2e/sst2/w4a8-parallel", ("mrem/sst2/w4a8-parallel",)),
        ("mrem-e2e/sst2/w2a8-parallel", ("mrem/sst2/w2a8-parallel",))]
    assert {s.name for s in mrem_e2e.plan(cfg)} <= {s.name for s in plan(cfg)}
    st = mrem_e2e.plan(cfg)[0]
    assert mrem.fragment(cfg, mrem.plan(cfg)[0]) == mrem.fragment(small(quant=["w4a8", "w2a8"]), mrem.plan(cfg)[0])
    other = dataclasses.replace(cfg, mrem=dataclasses.replace(cfg.mrem, e2e=E2eConfig(enabled=True, lr=1e-3)))
    assert mrem_e2e.fragment(cfg, st) != mrem_e2e.fragment(other, st)  # e2e settings key e2e, not mrem


@pytest.mark.parametrize("bad, match", [({"loss": "mse"}, "mrem.e2e.loss"), ({"samples": 0}, "mrem.e2e.samples"),
                                        ({"workers": 0}, "mrem.e2e.workers"), ({"lr": 2.0}, "mrem.e2e.lr")])
def test_bad_e2e_settings_are_refused(bad, match):
    from pipelines.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        MremConfig(e2e=E2eConfig(**bad)).validate()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_steps_train_on_the_fp_outputs_and_the_codes_stay(ray_session, tiny_teacher, tiny_data, tmp_path, workers):
    cfg = small(tiny_data, quant=["w2a8"], steps=10)
    cfg.mrem.e2e = E2eConfig(enabled=True, samples=64, batch_size=16, lr=1e-3, workers=workers, log_every=2)
    upstream = calibrated(cfg, tiny_teacher, tmp_path)
    source = run_mrem(cfg, tiny_teacher, tmp_path, upstream)
    stage = mrem_e2e.plan(cfg, tiny_teacher)[0]
    result = mrem_e2e.run(cfg, stage, {stage.deps[0]: dataclasses.asdict(source)}, Context(root=tmp_path, key="e1"))
    assert result.info["workers"] == workers and result.info["steps"] == 64 // 16
    assert result.info["before"]["value"] == source.row["value"] and 0 <= result.row["value"] <= 100
    assert result.row["method"] == "mrem-parallel+e2e-w2a8" and result.resources["cpus"] == workers
    meta = checkpoints.read_meta(result.checkpoint)
    assert meta["format"] == "packed" and meta["method"] == "mrem-parallel+e2e" and meta["quant"] == "w2a8"
    before, after = checkpoints.load(source.checkpoint).model, checkpoints.load(result.checkpoint).model
    b, a = dict(quant_modules(before)), dict(quant_modules(after))
    codes = [(b[n].weight_q.codes(b[n].linear_weight())[0], a[n].weight_q.codes(a[n].linear_weight())[0]) for n in b]
    assert all(torch.equal(x, y) for x, y in codes)  # MREM's integer codes, unchanged
    assert any(not torch.equal(b[n].act_q.step, a[n].act_q.step) for n in b)  # the steps trained
    assert any(not torch.equal(b[n].weight_q.step, a[n].weight_q.step) for n in b)
