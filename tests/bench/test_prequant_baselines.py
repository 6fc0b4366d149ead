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


def _merge(results, key, metric, lr, head_lr=None):
    detail = {"lr": lr, "train_s": lr, "head_lr": head_lr}
    prequant.merge_task(results, "mrpc", {key: metric}, {"details": {key: detail}})
    return results["mrpc"][key], results["details"]["mrpc"]["details"][key]


def test_lr_search_keeps_the_best_lr_and_every_score():
    results = {"details": {}}
    _merge(results, "lora_w4", 84.0, 2e-3)
    metric, detail = _merge(results, "lora_w4", 79.0, 5e-3)  # worse: the earlier lr stands
    assert (metric, detail["lr"], detail["train_s"]) == (84.0, 2e-3, 2e-3)
    metric, detail = _merge(results, "lora_w4", 85.0, 1e-3)  # better: it takes over, details included
    assert (metric, detail["lr"], detail["train_s"]) == (85.0, 1e-3, 1e-3)
    assert detail["lr_search"] == {"0.002": 84.0, "0.005": 79.0, "0.001": 85.0}


def test_a_rerun_at_the_same_lr_replaces_its_score():
    results = {"details": {}}
    _merge(results, "prequant_w4", 84.0, 2e-3)
    _merge(results, "prequant_w4", 86.0, 5e-3)
    metric, detail = _merge(results, "prequant_w4", 83.0, 5e-3)
    assert (metric, detail["lr"], detail["lr_search"]) == (84.0, 2e-3, {"0.002": 84.0, "0.005": 83.0})


def test_a_run_with_its_own_head_lr_joins_the_search_beside_the_same_lr():
    results = {"details": {}}
    _merge(results, "prequant_w4", 86.0, 2e-3)
    metric, detail = _merge(results, "prequant_w4", 85.0, 2e-3, head_lr=5e-4)  # not a re-run of 2e-3
    assert (metric, detail["head_lr"]) == (86.0, None)
    assert detail["lr_search"] == {"0.002": 86.0, "0.002 (head 0.0005)": 85.0}
    metric, detail = _merge(results, "prequant_w4", 87.0, 2e-3, head_lr=5e-4)  # its re-run replaces it
    assert (metric, detail["head_lr"], len(detail["lr_search"])) == (87.0, 5e-4, 2)


def test_fp_memory_comes_from_the_workers_measurement(tmp_path):
    from safetensors.torch import save_file
    import torch

    save_file({"w": torch.zeros(10, 3)}, str(tmp_path / "model.safetensors"))
    analytic = prequant.fp_details(str(tmp_path), {})
    assert (analytic["optimizer_state_bytes"], analytic["peak_rss_mb"]) == (8 * 30, None)
    (tmp_path / "plmq_meta.json").write_text(json.dumps({"optimizer_state_bytes": 250, "peak_rss_mb": 900.5}))
    measured = prequant.fp_details(str(tmp_path), {})
    assert (measured["optimizer_state_bytes"], measured["peak_rss_mb"], measured["trainable_params"]) == (250, 900.5, 30)


def _fake_peft(monkeypatch, seen: list) -> None:
    import contextlib

    monkeypatch.setattr(prequant.tracking, "parent_run", lambda *a: contextlib.nullcontext())
    monkeypatch.setattr(prequant, "run_prequant_quantize_stage", lambda c, q, m: SimpleNamespace(wall_s=1.0, reused=True))
    result = SimpleNamespace(eval=SimpleNamespace(main=0.85), quant_config="w4a8", trainable_pct=0.95,
                             trainable_params=1, optimizer_state_bytes=8, peak_rss_mb=1.0, train_s=2.0,
                             packed_bytes=3, steps=4)
    monkeypatch.setattr(prequant, "run_prequant_finetune_stage",
                        lambda c, t, q, m: seen.append((m, q, c.prequant.criterion, c.output_dir)) or result)


def _recipe_run(monkeypatch, overrides: list[str]) -> tuple[dict, dict, list[str]]:
    """run_task for fp_full and prequant_act_w4, both faked: (figures, details, the PEFT run's output dir)."""
    seen = []
    _fake_peft(monkeypatch, seen)
    monkeypatch.setattr(prequant, "fp_baseline", lambda cfg, task, out: (86.0, "ckpt", {
        "source": "run", "pooling": cfg.finetune.pooling, "epochs": cfg.finetune.epochs, "out": str(out)}))
    monkeypatch.setattr(prequant, "fp_details", lambda ckpt, info: dict(info))
    args = SimpleNamespace(config="configs/prequant.yaml", set=overrides, only=["fp_full", "prequant_act_w4"])
    row, info = prequant.run_task("mrpc", args)
    return row, info["details"], [x[3] for x in seen]


def _met(figures: dict) -> dict:
    return {x["target"]: x["met"] for x in prequant.check_targets({"tasks": ["mrpc"], "mrpc": figures})}


def test_mean_pooled_runs_are_kept_apart_and_judged_against_their_own_fp(monkeypatch):
    row, details, outs = _recipe_run(monkeypatch, ["finetune.pooling=mean"])
    assert row == {"fp_full_mean": 86.0, "prequant_act_w4_mean": 85.0}  # not the [CLS] head's keys
    assert details["fp_full_mean"]["pooling"] == details["prequant_act_w4_mean"]["pooling"] == "mean"
    assert details["fp_full_mean"]["out"].endswith("runs/prequant_mean")  # its own models
    assert outs[0].endswith("runs/prequant_mean")
    assert _met({"fp_full": 90.0, "prequant_act_w4": 85.0, **row, "lora_w4_mean": 85.5}) == {
        "prequant_act_w4 >= fp_full - 1.0": False, "prequant_act_w4_mean >= fp_full_mean - 1.0": True,
        "prequant_act_w4_mean >= lora_w4_mean": False}


def test_more_epochs_are_a_recipe_of_their_own(monkeypatch):
    row, details, outs = _recipe_run(monkeypatch, ["finetune.epochs=6", "finetune.pooling=mean"])
    assert row == {"fp_full_mean_e6": 86.0, "prequant_act_w4_mean_e6": 85.0}
    assert details["fp_full_mean_e6"]["out"].endswith("runs/prequant_mean_e6")  # its own models
    assert outs[0].endswith("runs/prequant_mean_e6") and details["fp_full_mean_e6"]["epochs"] == 6
    r = {"fp_full": 90.0, "prequant_act_w4": 85.0, "fp_full_e6": 84.0, "prequant_act_w4_e6": 83.5, **row}
    assert prequant.recipes(r) == ["", "_e6", "_mean_e6"]
    assert _met(r) == {"prequant_act_w4 >= fp_full - 1.0": False, "prequant_act_w4_e6 >= fp_full_e6 - 1.0": True,
                       "prequant_act_w4_mean_e6 >= fp_full_mean_e6 - 1.0": True}


def test_more_training_data_or_another_batch_is_a_recipe_of_their_own(monkeypatch):
    row, details, outs = _recipe_run(monkeypatch, ["data.train_examples=24000", "finetune.batch_size=16"])
    assert row == {"fp_full_n24000_b16": 86.0, "prequant_act_w4_n24000_b16": 85.0}
    assert outs[0].endswith("runs/prequant_n24000_b16")
    assert prequant.recipe_title("_e6_n24000_b16") == ("6 epochs (finetune.epochs=6), 24000 training examples "
                                                       "(data.train_examples=24000), batch 16 (finetune.batch_size=16)")


def test_a_setting_no_key_records_needs_a_pilot_file(monkeypatch):
    def no_work(*a):
        raise AssertionError("work started before the recipe was checked")

    monkeypatch.setattr(prequant, "fp_baseline", no_work)
    args = SimpleNamespace(config="configs/prequant.yaml", set=["finetune.weight_decay=0"], only=["fp_full"])
    with pytest.raises(SystemExit, match="finetune.weight_decay.*--out"):
        prequant.run_task("mrpc", args)
    monkeypatch.setattr(prequant, "fp_details", lambda ckpt, info: dict(info))
    monkeypatch.setattr(prequant, "fp_baseline", lambda cfg, task, out: (86.0, "ckpt", {"source": "run"}))
    row, _ = prequant.run_task("mrpc", SimpleNamespace(**vars(args), out="runs/pilot.json"))
    assert row == {"fp_full": 86.0}  # a pilot file keeps the main table's keys
    peft = SimpleNamespace(config="configs/prequant.yaml", set=["prequant.budget_pct=0.95"], only=["prequant_g128_w4"])
    with pytest.raises(SystemExit, match="prequant.budget_pct"):
        prequant.run_task("mrpc", peft)
    _fake_peft(monkeypatch, [])
    peft.set = ["prequant.lr=5e-3", "prequant.criterion=weight"]  # an lr search; a setting the key pins
    assert prequant.run_task("mrpc", peft)[0] == {"prequant_g128_w4": 85.0}


def test_the_smoke_recipe_is_its_own_main_table(monkeypatch):
    seen = []
    _fake_peft(monkeypatch, seen)
    args = SimpleNamespace(config="configs/prequant_tiny.yaml", set=[*prequant.SMOKE, "output_dir=runs/x"],
                           base_set=prequant.SMOKE, only=["prequant_w4"])
    row, _ = prequant.run_task("mrpc", args)
    assert list(row) == ["prequant_w4"] and seen[0][3].endswith("runs/x")


def test_keys_split_into_method_and_recipe():
    assert prequant.split_key("prequant_w4a8_mean_e6") == ("prequant_w4a8", "_mean_e6")
    assert prequant.split_key("prequant_w4") == ("prequant_w4", "")
    assert prequant.split_key("trainable_pct") is None
    assert prequant.recipe_title("_mean_e6") == "mean-pooled head (finetune.pooling=mean), 6 epochs (finetune.epochs=6)"


def test_a_peft_only_run_does_not_fine_tune_fp(monkeypatch):
    def no_fp(*a):
        raise AssertionError("fp_baseline ran for a PEFT-only run")

    monkeypatch.setattr(prequant, "fp_baseline", no_fp)
    seen = []
    _fake_peft(monkeypatch, seen)
    args = SimpleNamespace(config="configs/prequant.yaml", set=[], only=["prequant_act_w4a8", "lora_gptq_w4"])
    row, info = prequant.run_task("mrpc", args)
    assert row == {"prequant_act_w4a8": 85.0, "lora_gptq_w4": 85.0}
    assert [x[:3] for x in seen] == [("prequant", "w4a8", "activation"), ("lora", "w4", "weight")]
    details = info["details"]
    assert details["prequant_act_w4a8"]["criterion"] == "activation"  # each key's overrides, and only its own
    assert [prequant.quantizer_label(details[k]) for k in row] == ["row", "row-mse+gptq"]


def test_each_recipe_gets_a_table_of_the_tasks_it_ran(tmp_path):
    results = {"model": "m", "machine": "x", "tasks": ["mrpc", "sst2"], "details": {},
               "mrpc": {"majority_class": 81.22, "fp_full": 86.0, "fp_full_e6": 87.0, "prequant_act_w4_e6": 85.0},
               "sst2": {"fp_full": 88.0}}
    prequant.write(results, tmp_path / "r.json")
    md = (tmp_path / "r.md").read_text()
    table = md.split("## Recipe _e6: 6 epochs (finetune.epochs=6)")[1].split("##")[0]
    # each table shows the floor its figures are read against (always the majority train label)
    assert "| task | majority_class | fp_full_e6 | prequant_act_w4_e6 |" in table
    assert "| mrpc | 81.22 | 87 | 85 |" in table
    assert "sst2" not in table
    assert "prequant_act_w4_e6 >= fp_full_e6 - 1.0 | 85.0 vs 86.0 | False" in md  # against its own FP


def test_the_g128_figures_use_their_grid_and_are_judged_against_the_same_base(monkeypatch):
    seen, rtn = [], []
    _fake_peft(monkeypatch, seen)
    monkeypatch.setattr(prequant, "fp_baseline", lambda cfg, task, out: (86.0, "ckpt", {"source": "reference"}))
    monkeypatch.setattr(prequant, "rtn_baseline", lambda cfg, task, full, alias, *a: rtn.append((full, alias)) or (
        86.5, {"source": "run"}))
    args = SimpleNamespace(config="configs/prequant.yaml", set=[],
                           only=["rtn_w4", "rtn_g128_w4", "prequant_g128_w4", "lora_g128_w4"])
    row, info = prequant.run_task("mrpc", args)
    assert rtn[0] == ("w4a16", "w4")  # the config's grid: rtn.json's "w4" stands in
    assert rtn[1] == ("w4g128a16:weight.init=mse",) * 2  # its own grid, never rtn.json's "w4"
    labels = {k: prequant.quantizer_label(info["details"][k]) for k in ("prequant_g128_w4", "lora_g128_w4")}
    assert labels == {"prequant_g128_w4": "group-mse+gptq", "lora_g128_w4": "group-mse+gptq"}
    assert [x[:3] for x in seen] == [("prequant", "w4", "activation"), ("lora", "w4", "weight")]
    met = _met({"fp_full": 86.0, "prequant_g128_w4": 85.5, "lora_g128_w4": 85.0, "lora_w4": 86.0,
                "random_cols_g128_w4": 85.6, "random_cols_w4": 80.0, "prequant_g128_w3": 83.9})
    assert met == {"prequant_g128_w4 >= fp_full - 1.0": True, "prequant_g128_w3 >= fp_full - 2.0": False,
                   "prequant_g128_w4 >= lora_g128_w4": True,
                   "prequant_g128_w4 >= random_cols_g128_w4": False}


def test_the_g128_a8_and_asymmetric_w3_figures(monkeypatch):
    seen = []
    _fake_peft(monkeypatch, seen)
    args = SimpleNamespace(config="configs/prequant.yaml", set=[], only=["prequant_g128_w4a8", "prequant_g128asym_w3"])
    row, info = prequant.run_task("mrpc", args)
    assert [x[:3] for x in seen] == [("prequant", "w4a8", "activation"), ("prequant", "w3", "activation")]
    labels = [prequant.quantizer_label(info["details"][k]) for k in row]
    assert labels == ["group-mse+gptq", "group-mse-asym+gptq"]
    met = _met({"fp_full": 86.0, "prequant_g128_w4a8": 85.2, "prequant_g128asym_w3": 83.9})
    assert met == {"prequant_g128_w4a8 >= fp_full - 1.0": True, "prequant_g128asym_w3 >= fp_full - 2.0": False}


def test_the_scaled_step_keys_run_with_scaled_steps_and_are_judged_on_their_own_ablation(monkeypatch):
    seen = []
    _fake_peft(monkeypatch, seen)
    monkeypatch.setattr(prequant, "run_prequant_finetune_stage", lambda c, t, q, m: seen.append(
        (m, q, c.prequant.scale_outlier_lr)) or SimpleNamespace(
        eval=SimpleNamespace(main=0.85), quant_config=q, trainable_pct=0.95, trainable_params=1,
        optimizer_state_bytes=8, peak_rss_mb=1.0, train_s=2.0, packed_bytes=3, steps=4))
    args = SimpleNamespace(config="configs/prequant.yaml", set=[],
                           only=["prequant_g128_w4", "prequant_g128scaled_w4", "random_cols_g128scaled_w4"])
    row, info = prequant.run_task("mrpc", args)
    assert seen == [("prequant", "w4", False), ("prequant", "w4", True), ("random", "w4", True)]
    assert [info["details"][k]["scale_outlier_lr"] for k in row] == [False, True, True]
    met = _met({"prequant_g128scaled_w4": 85.0, "lora_g128_w4": 84.0, "random_cols_g128_w4": 86.0,
                "random_cols_g128scaled_w4": 84.5})
    assert met == {"prequant_g128scaled_w4 >= lora_g128_w4": True,
                   "prequant_g128scaled_w4 >= random_cols_g128scaled_w4": True}  # not random_cols_g128_w4


def test_each_key_keeps_its_recorded_base_whatever_the_config_recommends(monkeypatch):
    """configs/prequant.yaml recommends the g128 base; the main table's keys were recorded on the per-row
    min-max, weight-criterion, round-to-nearest base and must stay on it, under any config."""
    seen = []
    _fake_peft(monkeypatch, seen)
    for overrides in ([], ["prequant.quantizer=row-mse", "prequant.criterion=random", "prequant.gptq=false",
                           "prequant.scale_outlier_lr=true"]):
        args = SimpleNamespace(config="configs/prequant.yaml", set=overrides, only=["prequant_w4", "prequant_g128_w4"])
        _, info = prequant.run_task("mrpc", args)
        d = info["details"]
        assert [(d[k]["quantizer"], d[k]["criterion"], d[k]["gptq"], d[k]["scale_outlier_lr"])
                for k in ("prequant_w4", "prequant_g128_w4")] == [
            ("row", "weight", False, False), ("group-mse", "activation", True, False)]
