"""bench/prequant.py and bench/mrem.py: figures and replicates in their JSON layouts, the pages written
from them, and a figure read from the one driver's summary (a fake runner: no Ray, no training)."""
from __future__ import annotations

import json
import sys
import types
from types import SimpleNamespace

import pytest

from bench import common, mrem, prequant
from pipelines.config import load_config

RESULTS = common.ROOT / "bench" / "results"
HOW = {"lr": 0.002, "epochs": 6.0, "batch_size": 32}


def _prequant_results() -> dict:
    results = {"tasks": ["sst2"], "sst2": {"fp_full_e6": 88.0, "prequant_g128_w4_e6": 86.0, "majority_class": 50.9},
               "details": {"sst2": {"finetune": {"seed": 42}, "details": {
                   "fp_full_e6": {**HOW, "lr": 1e-4}, "prequant_g128_w4_e6": {**HOW, "trainable_pct": 0.95}}}}}
    prequant.add_replicate(results, "sst2", "prequant_g128_w4_e6", 1, 87.0, HOW)
    prequant.add_replicate(results, "sst2", "prequant_g128_w4_e6", 2, 70.0, {**HOW, "lr": 1e-3})  # another lr
    prequant.add_replicate(results, "sst2", "prequant_g128_w4_e6", 3, 70.0, {**HOW, "epochs": 12.0})
    prequant.add_replicate(results, "sst2", "prequant_g128_w4_e6", 4, 70.0, {**HOW, "head_lr": 5e-4})
    prequant.add_replicate(results, "sst2", "fp_full_e6", 1, 87.0, {**HOW, "lr": 1e-4})
    return results


def test_replicates_count_only_when_trained_like_the_main_figure():
    seeds = prequant.by_seed(_prequant_results(), "sst2")
    assert seeds["prequant_g128_w4_e6"] == {42: 86.0, 1: 87.0}
    assert seeds["fp_full_e6"] == {42: 88.0, 1: 87.0} and "majority_class" not in seeds


def test_a_rerun_of_a_replicate_replaces_it():
    results = _prequant_results()
    prequant.add_replicate(results, "sst2", "prequant_g128_w4_e6", 1, 85.0, {**HOW, "command": "again"})
    reps = results["replicates"]["sst2"]["prequant_g128_w4_e6"]
    assert [(r["seed"], r["metric"]) for r in reps if r["seed"] == 1] == [(1, 85.0)]


def test_the_prequant_page_opens_with_the_main_table_and_keeps_the_json(tmp_path):
    results = _prequant_results()
    before = json.dumps(results)
    prequant.write(results, tmp_path / "p.json", common.load_plan(prequant.PLAN_FILE))
    assert json.loads((tmp_path / "p.json").read_text()) == json.loads(before)
    md = (tmp_path / "p.md").read_text()
    first_table = md.split("\n| ")[1]
    assert first_table.startswith("task | method | figure | value | seeds | vs_fp")
    assert "| sst2 | prequant w4 | prequant_g128_w4_e6 | 86.5 | 2 | -1.00 | -1.00 ± 1.00 (2 seeds) | " \
           ">= fp - 1: met, paired +0.00 ± 1.00 (2 seeds) | 0.95 |" in md
    assert "| sst2 | majority class |  | 50.9 |" in md


@pytest.mark.parametrize("bench", [prequant, mrem])
def test_the_recorded_pages_are_what_the_writer_makes_of_the_recorded_json(bench, tmp_path):
    name = bench.RESULTS.name
    recorded = (RESULTS / name).read_text()
    (tmp_path / name).write_text(recorded)
    bench.write(json.loads(recorded), tmp_path / name, common.load_plan(bench.PLAN_FILE))
    assert (tmp_path / name).read_text() == recorded  # every figure kept as recorded
    md = (tmp_path / name).with_suffix(".md").read_text()
    assert md == (RESULTS / name).with_suffix(".md").read_text()
    assert md.count("\n## ") <= 1 and md.count("\n|---") <= 2  # the main table, then at most one other


def test_the_lr_search_merges_into_the_recorded_figures():
    results = {"tasks": ["mrpc"], "mrpc": {"lora_w4": 84.0}, "details": {"mrpc": {"details": {"lora_w4": HOW}}}}
    prequant.merge_task(results, "mrpc", {"lora_w4": 85.0, "rtn_w4": 80.0},
                        {"lora_w4": {**HOW, "lr": 1e-3}, "rtn_w4": {"wall_s": 1.0}})
    assert results["mrpc"] == {"lora_w4": 85.0, "rtn_w4": 80.0}
    assert results["details"]["mrpc"]["details"]["lora_w4"]["lr_search"] == {"0.002": 84.0, "0.001": 85.0}


@pytest.fixture
def fake_runner(monkeypatch):
    """pipelines.stages.plan_kinds and pipelines.runner.run stand-ins: the stages a figure asks for, and a
    summary whose outcomes follow the plan (the last stage with a report row is the figure)."""
    import pipelines.stages

    calls = []

    def plan_kinds(cfg, kinds, checkpoint=None, with_report=True):
        calls.append({"kinds": kinds, "checkpoint": checkpoint, "report": with_report})
        return [SimpleNamespace(name=f"{k}/{cfg.tasks[0]}", kind=k) for k in kinds]

    def run(cfg, stages=None, force=None, name="run"):
        calls[-1].update(cfg=cfg, name=name)
        outcomes = {s.name: {"row": None, "checkpoint": "m", "info": {"wall_s": 60.04, "steps": 3}} for s in stages}
        outcomes[stages[-1].name] = {"row": {"value": 85.5, "trainable_pct": 0.95, "wall_s": 9.0},
                                     "info": {"train_s": 7.0, "trainable_params": 10, "chain_errors": [0.1]}}
        return SimpleNamespace(outcomes=outcomes, rows=[], wall_s=9.0)

    monkeypatch.setattr(pipelines.stages, "plan_kinds", plan_kinds, raising=False)
    monkeypatch.setitem(sys.modules, "pipelines.runner", types.SimpleNamespace(run=run))
    monkeypatch.setattr(sys.modules["pipelines"], "runner", sys.modules["pipelines.runner"], raising=False)
    return calls


def test_a_figure_is_run_by_the_one_driver_and_read_from_its_summary(fake_runner):
    plan = common.load_plan(prequant.PLAN_FILE)
    args = SimpleNamespace(set=[], seed=None, only=["lora_g128_w4_e6"], output_dir="runs/x", command="cmd",
                           config=plan.config)
    row, details = prequant.run_task("mrpc", plan, args)
    assert row == {"lora_g128_w4_e6": 85.5}
    call = fake_runner[0]
    assert call["kinds"] == ("prequant-quantize", "prequant-finetune")  # no FP fine-tuning for a PEFT figure
    assert (call["name"], call["report"]) == ("bench-lora_g128_w4_e6", False)
    cfg = call["cfg"]
    assert (cfg.prequant.methods, cfg.prequant.quantizer, cfg.finetune.epochs) == (["lora"], "group-mse", 6)
    d = details["lora_g128_w4_e6"]
    assert (d["train_s"], d["trainable_params"], d["lr"], d["criterion"], d["command"]) == (7.0, 10, 2e-3,
                                                                                          "weight", "cmd")


def test_fp_and_rtn_figures_ask_for_their_own_stages(fake_runner):
    plan = common.load_plan(prequant.PLAN_FILE)
    for key in ("fp_full_e6", "rtn_g128_w4_e6"):
        fig = plan.figures[key]
        cfg = load_config(common.ROOT / plan.config, prequant.figure_overrides(
            plan, fig, "mrpc", SimpleNamespace(set=[], seed=None, output_dir="runs/x")))
        metric, detail = prequant.run_figure(cfg, fig)
        assert metric == 85.5 and detail["train_s"] == (60.0 if fig.method == "fp" else 7.0)
    assert [c["kinds"] for c in fake_runner] == [("finetune", "evaluate"), ("finetune", "rtn")]


def test_mrem_figures_start_from_the_fp_reference(fake_runner):
    plan = common.load_plan(mrem.PLAN_FILE)
    fig = plan.figures["mrem_p_w2a8"]
    args = SimpleNamespace(set=[], seed=None)
    metric, detail = mrem.run_figure(mrem.figure_config(plan, fig, "rte", args), fig, "rte")
    call = fake_runner[0]
    assert call["kinds"] == ("calibrate", "mrem")
    assert call["checkpoint"].endswith("runs/fp_reference/rte/finetune/model")
    assert (metric, detail["module_errors"], detail["steps"], detail["student_dropout"]) == (85.5, [0.1], 400, False)


def _mrem_task() -> dict:
    return {"metrics": {"fp": 86.0, "mrem_p_w4a8": 85.0, "mrem_s_w4a8": 86.0},
            "details": {"mrem_p_w4a8": {"student_dropout": False}, "mrem_s_w4a8": {"student_dropout": True}},
            "seeds": {"1": {"metrics": {"fp": 86.0, "mrem_p_w4a8": 86.0, "mrem_s_w4a8": 85.0},
                            "details": {"mrem_p_w4a8": {"student_dropout": False},
                                        "mrem_s_w4a8": {"student_dropout": False}}}}}


def test_mrem_replicates_need_the_same_training_and_fp_is_one_value():
    res = _mrem_task()
    seeds = mrem.by_seed(res)
    assert seeds["mrem_p_w4a8"] == {0: 85.0, 1: 86.0}
    assert seeds["mrem_s_w4a8"] == {0: 86.0}  # seed 0 trained with dropout, and one replicate is not a mean
    assert seeds["fp"] == {0: 86.0}
    res["seeds"]["2"] = {"metrics": {"mrem_p_w4a8": 80.0},
                         "details": {"mrem_p_w4a8": {"student_dropout": False, "steps": 800}}}
    assert mrem.by_seed(res)["mrem_p_w4a8"] == {0: 85.0, 1: 86.0}  # 800 steps: not a replicate of 400


def test_mrem_bars_on_seed_means():
    plan = common.load_plan(mrem.PLAN_FILE)
    rows = {r["figure"]: r for r in common.main_rows(plan, "t", mrem.by_seed(_mrem_task()))}
    assert rows["mrem_p_w4a8"]["value"] == 85.5  # seed 0 alone (85.0) would miss fp - 0.5
    assert rows["mrem_p_w4a8"]["targets"] == ">= fp - 0.5: met; abs(mrem-p w4a8 - mrem-s w4a8) <= 0.5: met"
