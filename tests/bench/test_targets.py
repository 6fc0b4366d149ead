"""The Targets tables of bench/mrem.py and bench/prequant.py judge the issues' bars."""
from __future__ import annotations

from bench import mrem, prequant


def _met(rows: list[dict]) -> dict[str, bool]:
    return {r["target"]: r["met"] for r in rows}


def test_mrem_bars_met_missed_and_skipped_when_a_figure_is_missing():
    metrics = {"fp": 86.0, "rtn_w2a8": 80.0, "mrem_p_w4a8": 85.6, "mrem_s_w4a8": 85.0, "mrem_p_w2a8": 84.0}
    met = _met(mrem.check_targets({"tasks": {"t": {"metrics": metrics, "speed": {"speedup_p2_vs_s": 1.69}}}}))
    assert met == {"mrem_p_w4a8 >= fp - 0.5": True, "mrem_p_w2a8 >= fp - 1.5": False,
                   "mrem_p_w2a8 >= rtn_w2a8 + 2": True, "|mrem_p_w4a8 - mrem_s_w4a8| <= 0.5": False,
                   "speed-up P (2 actors) vs S >= 1.7x": False}  # no mrem_s_w2a8: that gap is not judged


def test_prequant_bars_and_budget():
    r = {"fp_full": 87.0, "prequant_w4": 86.0, "prequant_act_w4": 86.6, "prequant_w3": 84.9, "prequant_act_w3": 85.0,
         "prequant_act_w4a8": 85.9, "lora_w4": 86.5, "prequant_g128_w8": 80.0, "trainable_pct": 0.95}
    met = _met(prequant.check_targets({"tasks": ["t"], "t": r}))
    assert met == {"prequant_w4 >= fp_full - 1.0": True, "prequant_act_w4 >= fp_full - 1.0": True,
                   "prequant_w3 >= fp_full - 2.0": False, "prequant_act_w3 >= fp_full - 2.0": True,
                   "prequant_act_w4a8 >= fp_full - 1.0": False,
                   "prequant_w4 >= lora_w4": False,
                   "prequant_act_w4 >= lora_w4": True, "trainable <= 1%": True}  # W8: a diagnostic, no bar


def test_prequant_replicates_are_judged_by_their_mean_at_the_main_figures_schedule():
    how = {"lr": 0.005, "epochs": 3.0, "batch_size": 32}
    results = {"tasks": ["mrpc"], "mrpc": {"fp_full": 86.4, "prequant_act_w4": 85.9, "lora_w4": 84.4},
               "details": {"mrpc": {"details": {"prequant_act_w4": dict(how), "lora_w4": {**how, "lr": 0.002}}}}}
    prequant.add_replicate(results, "mrpc", "prequant_act_w4", 1, 83.5, {**how, "command": "c1"})
    prequant.add_replicate(results, "mrpc", "prequant_act_w4", 2, 90.0, {**how, "lr": 0.002})  # another lr
    prequant.add_replicate(results, "mrpc", "lora_w4", 1, 85.0, {**how, "epochs": 6.0})  # another schedule
    prequant.add_replicate(results, "mrpc", "prequant_act_w4", 3, 70.0, {**how, "head_lr": 1e-4})  # another head lr
    assert prequant.seed_stats(results, "mrpc") == {
        "prequant_act_w4": {"values": [85.9, 83.5], "by_seed": {42: 85.9, 1: 83.5}, "mean": 84.7, "std": 1.7}}
    met = _met(prequant.check_targets(results))
    assert met["prequant_act_w4 >= fp_full - 1.0 (seed mean)"] is False  # 84.7; the main seed alone (85.9) met it
    assert met["prequant_act_w4 >= lora_w4 (seed mean)"] is True
    prequant.add_replicate(results, "mrpc", "prequant_act_w4", 1, 86.1, {**how, "command": "c2"})  # a re-run
    assert prequant.seed_stats(results, "mrpc")["prequant_act_w4"]["values"] == [85.9, 86.1]


def test_runs_from_before_student_dropout_are_listed_as_with_dropout():
    details = {"rtn_w4a8": {"wall_s": 1.0}, "mrem_p_w4a8": {"module_errors": [0.1], "student_dropout": False},
               "mrem_s_w4a8": {"module_errors": [0.1]}}
    assert mrem.with_dropout(details) == "mrem_s_w4a8"


def test_prequant_gaps_are_paired_by_seed():
    how = {"lr": 0.002, "epochs": 6.0, "batch_size": 32}
    results = {"tasks": ["sst2"], "sst2": {"fp_full": 88.0, "prequant_act_w4": 87.5, "lora_w4": 86.0},
               "details": {"sst2": {"details": {k: dict(how) for k in ("fp_full", "prequant_act_w4", "lora_w4")}}}}
    for seed, fp, pq in ((1, 86.0, 85.3), (2, 87.0, 86.1)):  # PreQuant 0.5-0.9 under FP at every seed
        prequant.add_replicate(results, "sst2", "fp_full", seed, fp, how)
        prequant.add_replicate(results, "sst2", "prequant_act_w4", seed, pq, how)
    prequant.add_replicate(results, "sst2", "lora_w4", 7, 85.0, how)  # no seed in common with PreQuant but 42
    rows = {r["target"]: r for r in prequant.check_targets(results)}
    fp_bar = rows["prequant_act_w4 >= fp_full - 1.0 (seed mean)"]
    assert fp_bar["met"] and fp_bar["paired_gap"] == "+0.30 ± 0.12 (3 seeds)"  # gaps +0.5, +0.3, +0.1
    assert rows["prequant_act_w4 >= lora_w4 (seed mean)"]["paired_gap"] is None  # one common seed


def test_replicates_are_judged_by_their_mean_and_need_the_same_training():
    res = {"metrics": {"fp": 86.0, "mrem_p_w4a8": 85.0, "mrem_s_w4a8": 86.0},
           "details": {"mrem_p_w4a8": {"student_dropout": False}, "mrem_s_w4a8": {"student_dropout": True}},
           "seeds": {"1": {"metrics": {"mrem_p_w4a8": 86.0, "mrem_s_w4a8": 85.0},
                           "details": {"mrem_p_w4a8": {"student_dropout": False},
                                       "mrem_s_w4a8": {"student_dropout": False}}}}}
    stats = mrem.seed_stats(res)
    assert stats == {"mrem_p_w4a8": {"values": [85.0, 86.0], "mean": 85.5, "std": 0.71}}  # S's seed 0 differs
    met = _met(mrem.check_targets({"tasks": {"t": res}}))
    assert met["mrem_p_w4a8 >= fp - 0.5 (seed mean)"] is True  # 85.5; seed 0 alone (85.0) would miss
    assert met["|mrem_p_w4a8 - mrem_s_w4a8| <= 0.5 (seed mean)"] is True  # |85.5 - 85.0|
    res["seeds"]["2"] = {"metrics": {"mrem_p_w4a8": 80.0},
                         "details": {"mrem_p_w4a8": {"student_dropout": False, "steps": 800}}}
    assert mrem.seed_stats(res)["mrem_p_w4a8"]["values"] == [85.0, 86.0]  # 800 steps: not a replicate of 400
    del res["seeds"]["2"]
    view = mrem.issue_view({"tasks": {"t": {**res, "speed": {"speedup_p2_vs_s": 1.8}, "wall_s": {"x": 1.0}}}})
    assert view["t"] == {"fp": 86.0, "mrem_p_w4a8": 85.5, "mrem_s_w4a8": 86.0}  # the issue's {task: {key: m}}
    assert view["speedup_p2_vs_s"] == 1.8 and view["wall_s"] == {"t": {"x": 1.0}}


def test_recorded_figures_are_logged_to_mlflow(mlflow_uri, tmp_path):
    import json

    import mlflow

    results = {"tasks": {"t": {"metrics": {"fp": 86.0, "mrem_p_w4a8": 85.6}, "details": {}}}, "command": "c"}
    path = tmp_path / "mrem.json"
    path.write_text(json.dumps(results))
    path.with_suffix(".md").write_text("table")
    run = mlflow.get_run(mrem.log_to_mlflow(results, "bench-test", path))
    assert run.data.metrics == {"t.fp": 86.0, "t.mrem_p_w4a8": 85.6}
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert names == {"mrem.json", "mrem.md", "mrem_figures.json", "mrem_targets.json"}
    table = mlflow.load_table("mrem_targets.json", run_ids=[run.info.run_id])
    assert list(table["target"]) == ["mrem_p_w4a8 >= fp - 0.5"] and list(table["met"]) == [True]


def test_prequant_bars_show_how_many_lrs_each_side_searched():
    searched = {"lr": 0.002, "epochs": 6.0, "lr_search": {"0.002": 86.2, "0.001": 84.9}}
    results = {"tasks": ["sst2"], "sst2": {"fp_full": 87.0, "prequant_w4": 86.2, "lora_w4": 86.0, "rtn_w4": 80.0},
               "details": {"sst2": {"details": {"prequant_w4": searched, "fp_full": {"lr": 1e-4, "epochs": 6.0},
                                                "rtn_w4": {"wall_s": 1.0}}}}}
    rows = {r["target"]: r["lrs"] for r in prequant.check_targets(results) if "lrs" in r}
    assert rows["prequant_w4 >= fp_full - 1.0"] == "2 / 1"
    assert rows["prequant_w4 >= lora_w4"] == "2 / ?"  # lora_w4 has no details: nothing recorded to count
    assert prequant.lrs_tried({"wall_s": 1.0}) == 0  # RTN: no lr to search
