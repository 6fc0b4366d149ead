"""bench/common.py judges targets on seed means, pairs gaps by seed, and builds the main and ablation
tables from fabricated figures."""
from __future__ import annotations

import pytest

from bench import common


def _plan(**kw) -> common.Plan:
    figures = {k: common.Figure(k, "x") for k in ("fp", "pq", "lora", "rtn", "pq_s")}
    return common.Plan(config="c.yaml", figures=figures, recipes={"main": []}, **kw)


def test_a_bar_is_judged_on_the_seed_mean_with_the_gap_paired_by_seed():
    # PreQuant 0.5, 0.3, 0.1 over FP - 1 at every seed: met, and the paired gap says so with a small error
    by_seed = {"fp": {1: 88.0, 2: 86.0, 3: 87.0}, "pq": {1: 87.5, 2: 85.3, 3: 86.1}}
    j = common.judge(common.Target("pq", "fp", margin=1.0), by_seed)
    assert (j["measured"], j["bar"], j["met"]) == (86.3, 86.0, True)
    assert j["paired_gap"] == "+0.30 ± 0.12 (3 seeds)"
    by_seed["pq"] = {1: 85.0, 2: 85.0, 7: 90.0}  # the mean meets the bar; only seeds 1 and 2 pair
    j = common.judge(common.Target("pq", "fp", margin=1.0), by_seed)
    assert j["met"] and j["paired_gap"] == "-1.00 ± 1.00 (2 seeds)"


def test_within_and_above_bars_and_a_missing_side():
    by_seed = {"pq": {0: 86.0}, "pq_s": {0: 85.4}, "rtn": {0: 80.0}}
    assert common.judge(common.Target("pq", "pq_s", within=0.5), by_seed)["met"] is False  # |0.6| > 0.5
    assert common.judge(common.Target("pq", "rtn", margin=-2.0), by_seed)["bar"] == 82.0  # rtn + 2
    assert common.Target("pq", "rtn", margin=-2.0).label == "pq >= rtn + 2"
    assert common.judge(common.Target("pq", "lora"), by_seed) is None  # lora not run: not judged


def test_paired_gaps_need_two_common_seeds():
    assert common.paired_gap({1: 1.0, 2: 2.0}, {1: 0.0, 3: 0.0}) is None
    assert common.paired_gap({1: 1.0, 2: 3.0}, {1: 0.0, 2: 0.0}) == pytest.approx((2.0, 1.0, 2))


def test_the_main_table_shows_each_method_against_fp_with_its_targets():
    plan = _plan(main={"fp": "fp", "prequant w4": "pq", "lora w4": "lora"},
                 targets=[common.Target("pq", "fp", margin=1.0), common.Target("pq", "lora")])
    by_seed = {"fp": {1: 88.0, 2: 87.0}, "pq": {1: 86.0, 2: 86.5}, "lora": {1: 86.5}}
    rows = common.main_rows(plan, "sst2", by_seed, info=lambda key: {"trainable_pct": 0.95})
    assert [r["method"] for r in rows] == ["fp", "prequant w4", "lora w4"]
    pq = rows[1]
    assert (pq["value"], pq["seeds"], pq["vs_fp"], pq["trainable_pct"]) == (86.25, 2, "-1.25", 0.95)
    assert pq["paired_vs_fp"] == "-1.25 ± 0.75 (2 seeds)"
    assert pq["targets"] == ">= fp - 1: missed, paired -0.25 ± 0.75 (2 seeds); >= lora w4: missed"
    assert rows[0]["vs_fp"] is None and rows[2]["targets"] is None


def test_ablations_appear_only_where_both_figures_ran():
    plan = _plan(ablations=[{"figure": "pq_s", "vs": "pq", "change": "scaled"},
                            {"figure": "lora", "vs": "pq", "change": "LoRA"}])
    rows = common.ablation_rows(plan, "rte", {"pq": {1: 53.0, 2: 55.0}, "pq_s": {1: 50.0, 2: 51.0}})
    assert [(r["change"], r["delta"], r["paired"]) for r in rows] == [("scaled", "-3.50", "-3.50 ± 0.50 (2 seeds)")]


def test_a_page_has_the_main_table_then_at_most_one_other():
    md = common.markdown("T", "intro", ([{"a": 1}], ["a"]), ("Ablations", "text", [{"b": 2}], ["b"]), "foot")
    assert md.index("| a |") < md.index("## Ablations") < md.index("| b |") < md.index("foot")
    assert md.count("## ") == 1
    assert "## " not in common.markdown("T", "intro", ([{"a": 1}], ["a"]), ("Ablations", "text", [], ["b"]))


def test_the_lr_search_keeps_the_best_lr_and_every_score():
    fig = common.merge_figure(None, (84.0, {"lr": 2e-3, "train_s": 1}))
    fig = common.merge_figure(fig, (79.0, {"lr": 5e-3, "train_s": 2}))  # worse: the earlier lr stands
    assert (fig[0], fig[1]["lr"], fig[1]["train_s"]) == (84.0, 2e-3, 1)
    fig = common.merge_figure(fig, (85.0, {"lr": 1e-3, "train_s": 3}))  # better: it takes over, details too
    assert (fig[0], fig[1]["lr"], fig[1]["train_s"]) == (85.0, 1e-3, 3)
    assert fig[1]["lr_search"] == {"0.002": 84.0, "0.005": 79.0, "0.001": 85.0}
    fig = common.merge_figure(fig, (80.0, {"lr": 1e-3, "train_s": 4}))  # a re-run at 1e-3 replaces its score
    assert (fig[0], fig[1]["lr_search"]["0.001"]) == (84.0, 80.0)
    assert common.merge_figure((80.0, {"wall_s": 1}), (81.0, {"wall_s": 2}))[0] == 81.0  # RTN: no lr, replaced
    assert [common.lrs_tried(d) for d in (fig[1], {"wall_s": 1}, None)] == [3, 0, "?"]


def test_recorded_figures_are_logged_to_mlflow(mlflow_uri, tmp_path):
    import mlflow

    path = tmp_path / "r.json"
    common.write_results(path, {"x": 1}, "page\n")
    tables = {"main": [{"task": "t", "target": "a >= b", "met": True}]}
    run = mlflow.get_run(common.log_results("bench-test", [path, path.with_suffix(".md")], tables,
                                            {"t.a": 86.0, "t.note": "text"}, "c"))
    assert run.data.metrics == {"t.a": 86.0}
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert names == {"r.json", "r.md", "main.json"}
    assert list(mlflow.load_table("main.json", run_ids=[run.info.run_id])["met"]) == [True]
