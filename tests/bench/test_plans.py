"""bench/plans/*.yaml: every recorded figure has a plan entry, every runnable entry makes a valid config
narrowed to its one method, and figures whose settings left the product cannot be run again."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from bench import common, mrem, prequant
from pipelines.config import load_config

RESULTS = common.ROOT / "bench" / "results"


def _args(**kw) -> SimpleNamespace:
    return SimpleNamespace(**{"set": [], "seed": None, "out": None, "only": None,
                              "output_dir": prequant.OUTPUT_DIR, **kw})


def test_every_recorded_prequant_figure_has_a_plan_entry():
    results = json.loads((RESULTS / "prequant.json").read_text())
    recorded = {k for t in results["tasks"] for k in results[t]} - {"trainable_pct", "majority_class"}
    recorded |= {k for reps in results["replicates"].values() for k in reps}
    assert recorded - set(common.load_plan(prequant.PLAN_FILE).figures) == set()


def test_every_recorded_mrem_figure_has_a_plan_entry():
    results = json.loads((RESULTS / "mrem.json").read_text())
    recorded = {k for r in results["tasks"].values() for k in r["metrics"]}
    assert recorded - set(common.load_plan(mrem.PLAN_FILE).figures) == set()


def test_each_figure_runs_its_recipe_then_its_base_then_its_own_settings():
    plan = common.load_plan(prequant.PLAN_FILE)
    over = plan.overrides("prequant_g128norms_w4_e6")
    assert over[0] == "finetune.epochs=6"
    assert {"prequant.quantizer=group-mse", "prequant.criterion=activation", "prequant.gptq=true",
            "prequant.train_norms=true"} <= set(over)
    assert plan.overrides("fp_full") == []  # the config file's recipe


@pytest.mark.parametrize("key", [k for k, f in common.load_plan(prequant.PLAN_FILE).figures.items()
                                 if not f.recorded_only])
def test_each_runnable_prequant_figure_is_a_valid_config_of_one_method(key):
    plan = common.load_plan(prequant.PLAN_FILE)
    fig = plan.figures[key]
    cfg = load_config(common.ROOT / plan.config, prequant.figure_overrides(plan, fig, "mrpc", _args()))
    assert cfg.tasks == ["mrpc"] and cfg.mrem.quant == []
    assert cfg.output_dir == f"{prequant.OUTPUT_DIR}/{fig.recipe}"  # FP is shared by a recipe's figures
    if fig.method == "fp":
        assert (cfg.rtn.quant, cfg.prequant.quant) == ([], [])
    elif fig.method == "rtn":
        assert (cfg.rtn.quant, cfg.prequant.quant) == ([fig.quant], [])
    else:
        assert (cfg.prequant.quant, cfg.prequant.methods, cfg.rtn.quant) == ([fig.quant], [fig.method], [])


def test_a_replicate_keeps_its_models_apart_and_sets_the_seed():
    plan = common.load_plan(prequant.PLAN_FILE)
    over = prequant.figure_overrides(plan, plan.figures["prequant_g128_w4_e6"], "sst2", _args(seed=3))
    cfg = load_config(common.ROOT / plan.config, over)
    assert (cfg.finetune.seed, cfg.output_dir, cfg.finetune.epochs) == (3, f"{prequant.OUTPUT_DIR}/e6_seed3", 6)


def test_the_mrem_figures_set_their_mode_and_quant():
    plan = common.load_plan(mrem.PLAN_FILE)
    cfg = mrem.figure_config(plan, plan.figures["mrem_s_w2a8"], "rte", _args(seed=2))
    assert (cfg.mrem.mode, cfg.mrem.quant, cfg.mrem.seed, cfg.tasks) == ("sequential", ["w2a8"], 2, ["rte"])
    cfg = mrem.figure_config(plan, plan.figures["rtn_w4a8"], "rte", _args())
    assert (cfg.rtn.quant, cfg.mrem.quant) == (["w4a8"], [])
    fixed = mrem.figure_config(plan, plan.figures["mrem_p_w2a8"], "rte", _args())
    assert (fixed.mrem.converge, fixed.mrem.steps) == (False, 400)  # as recorded, before convergence existed
    conv = mrem.figure_config(plan, plan.figures["mrem_p_conv_e2e_w2a8"], "rte", _args())
    assert (conv.mrem.converge, conv.mrem.steps, conv.mrem.e2e.enabled) == (True, None, True)
    assert mrem.KINDS[plan.figures["mrem_p_conv_e2e_w2a8"].method][-1] == "mrem-e2e"


def test_figures_of_removed_settings_are_recorded_only():
    plan = common.load_plan(prequant.PLAN_FILE)
    stale = {k for k, f in plan.figures.items() if f.recorded_only}
    assert {"prequant_g128scaled_w4_e6", "prequant_g128nodrop_w4_e6", "prequant_g128drop20_w4_e6",
            "prequant_g128top2_w4_e6", "prequant_g128normsscaled_w4_e6"} == stale
    removed = ("scale_outlier_lr", "body_dropout", "column_blocks", "head_lr")
    assert not [o for k in plan.figures for o in plan.overrides(k) if o.split("=")[0].split(".")[-1] in removed]
    assert stale.isdisjoint(f.key for f in plan.runnable(None))  # a whole-plan run skips them
    with pytest.raises(SystemExit, match="prequant_g128top2_w4_e6.*column_blocks"):
        plan.runnable(["prequant_g128_w4_e6", "prequant_g128top2_w4_e6"])
    with pytest.raises(SystemExit, match="not in the plan: prequant_w4_e6"):  # no suffix grammar: keys are listed
        plan.runnable(["prequant_w4_e6"])


def test_a_plan_naming_a_figure_it_lacks_is_refused(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("config: c.yaml\nrecipes: {main: []}\nfigures: {a: {method: fp}}\n"
                    "targets: [{figure: a, vs: b}]\n")
    with pytest.raises(ValueError, match="'b'"):
        common.load_plan(path)
    path.write_text("config: c.yaml\nrecipes: {main: []}\nfigures: {a: {method: fp, recipe: e9}}\n")
    with pytest.raises(ValueError, match="unknown recipe or base: \\['a'\\]"):
        common.load_plan(path)


def test_a_setting_no_key_records_needs_a_pilot_file():
    prequant.check_set(_args(set=["prequant.lr=1e-3", "finetune.lr=5e-5"]))  # the lr search: recorded
    with pytest.raises(SystemExit, match="prequant.budget_pct=0.9.*--out"):
        prequant.check_set(_args(set=["prequant.budget_pct=0.9"]))
    prequant.check_set(_args(set=["prequant.budget_pct=0.9"], out="runs/pilot.json"))
