"""The real `finetune` stage (Ray Train, 1 CPU worker) and the driver's MLflow runs."""
from __future__ import annotations

import json

import mlflow
import pytest

from pipelines import checkpoints
from pipelines.config import FinetuneConfig, load_config
from pipelines.runner import run
from pipelines.training import make_optimizer


@pytest.fixture
def separable_cfg(tmp_path, cache_dir, separable_glue):
    return load_config(None, separable_overrides(tmp_path, cache_dir, separable_glue))


def separable_overrides(tmp_path, cache_dir, glue_dir) -> list[str]:
    return ["model=tiny-bert", "tasks=[sst2]", f"output_dir={tmp_path / 'out'}", "experiment=plmq-test",
            "data.source=dir", f"data.dir={glue_dir}", "data.max_length=16", f"data.cache_dir={cache_dir}",
            "finetune.epochs=3", "finetune.batch_size=16", "finetune.lr=2e-3", "finetune.log_every=10",
            "finetune.warmup_ratio=0.05"]


@pytest.mark.ray
@pytest.mark.slow
def test_finetune_reaches_high_accuracy_and_logs_nested_runs(ray_session, mlflow_uri, separable_cfg, monkeypatch):
    summary = run(separable_cfg)
    (row,) = summary.rows
    assert row["task"] == "sst2" and row["metric"] == "accuracy"
    assert row["value"] >= 90.0, f"tiny-bert reached only {row['value']}% on a separable task"

    exp = mlflow.get_experiment_by_name("plmq-test")
    runs = mlflow.search_runs([exp.experiment_id], output_format="list")
    parent = next(r for r in runs if r.info.run_id == summary.parent_run_id)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary.parent_run_id]
    assert {c.info.run_name for c in children} == {"finetune/sst2", "evaluate/sst2/fp", "report"}
    assert parent.data.params["finetune.lr"] == "0.002" and parent.data.params["model"] == "tiny-bert"
    finetune_run = next(c for c in children if c.info.run_name == "finetune/sst2")
    history = mlflow.MlflowClient().get_metric_history(finetune_run.info.run_id, "train_loss")
    assert len(history) >= 3 and history[-1].value < history[0].value  # per-step losses from the worker
    eval_run = next(c for c in children if c.info.run_name == "evaluate/sst2/fp")
    assert eval_run.data.metrics["eval_accuracy"] == pytest.approx(row["value"] / 100, abs=1e-4)
    assert eval_run.data.metrics["model_bytes"] > 0
    saved = json.loads(open(summary.output_dir + "/results.json").read())
    assert saved[0]["value"] == row["value"]

    # Same inputs again: both stages are complete, nothing is recomputed, the result is identical.
    again = run(separable_cfg)
    assert again.rows[0]["value"] == row["value"]
    assert sorted(again.skipped) == ["evaluate/sst2/fp", "finetune/sst2"]
    child_runs = mlflow.search_runs([exp.experiment_id], output_format="list",
                                    filter_string=f"tags.mlflow.parentRunId = '{again.parent_run_id}'")
    assert [r.info.run_name for r in child_runs] == ["report"]  # the report is redone from the records

    # The worker measured its memory: full fine-tuning keeps two AdamW moments per parameter.
    model_dir = summary.outcomes["finetune/sst2"]["checkpoint"]
    meta = checkpoints.read_meta(model_dir)
    assert meta["format"] == "fp" and meta["wall_s"] > 0 and meta["final_loss"] > 0
    n_params = sum(p.numel() for p in checkpoints.load(model_dir).model.parameters())
    assert meta["optimizer_state_bytes"] >= 8 * n_params and meta["peak_rss_mb"] > 100


def test_optimizer_gives_named_parameters_their_own_lr_and_skips_frozen_ones():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    cfg = FinetuneConfig(lr=1e-3, weight_decay=0.01, warmup_ratio=0.0)
    optimizer, scheduler = make_optimizer(model, cfg, total=10, lr_of=lambda n: 5e-2 if n.startswith("1.") else None)
    groups = {(g["lr"], g["weight_decay"]): sum(p.numel() for p in g["params"]) for g in optimizer.param_groups}
    assert groups == {(1e-3, 0.0): 4, (5e-2, 0.01): 8, (5e-2, 0.0): 2}  # model[0].weight: no group, no state
    scheduler.step()
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx([9e-4, 4.5e-2, 4.5e-2])  # both decay


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_worker_or_driver_resumes_and_trains_the_same_weights(ray_session, mlflow_uri, separable_cfg,
                                                                       tmp_path, cache_dir, separable_glue,
                                                                       inject_faults):
    """The Train worker dies at step 80 of 114 (pipelines.faults); Ray Train restarts it from its latest registered
    checkpoint with its RNG state (step 38 or 76: by step 80 the worker has handed over the step-76 report, which
    waits until Ray Train took the step-38 one). Then `plmq run` itself is killed while its worker is at step 80: the
    same command again resumes the fine-tune. Both models equal an uninterrupted run's bit for bit."""
    import dataclasses
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch
    from safetensors.torch import load_file

    from pipelines import faults

    cfg = separable_cfg  # 3 epochs of 38 steps
    whole = run(dataclasses.replace(cfg, output_dir=str(tmp_path / "whole")))
    fired = inject_faults("finetune.rank0@80")
    cut = run(dataclasses.replace(cfg, output_dir=str(tmp_path / "cut")))
    assert fired() == ["finetune.rank0@80"]

    driver_dir, markers = tmp_path / "driver", tmp_path / "driver-faults"
    markers.mkdir()
    sets = [f"--set={o}" for o in separable_overrides(tmp_path, cache_dir, separable_glue)]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           faults.ENV: "finetune.rank0@80:hold", faults.DIR_ENV: str(markers)}
    driver = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", *sets, f"--set=output_dir={driver_dir}"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not faults.fired(markers) and driver.poll() is None:  # the test's timeout bounds this wait
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    assert driver.wait() == -signal.SIGKILL and faults.fired(markers) == ["finetune.rank0@80"]
    again = run(dataclasses.replace(cfg, output_dir=str(driver_dir)))

    a = load_file(f"{whole.outcomes['finetune/sst2']['checkpoint']}/model.safetensors")
    assert whole.outcomes["finetune/sst2"]["info"]["resumed_from_step"] == 0
    for resumed in (cut, again):
        assert resumed.outcomes["finetune/sst2"]["info"]["resumed_from_step"] in (38, 76)
        b = load_file(f"{resumed.outcomes['finetune/sst2']['checkpoint']}/model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert resumed.rows[0]["value"] == whole.rows[0]["value"]


def _separable_cola(glue_dir) -> None:
    """CoLA's headerless layout (source, label, mark, sentence) from the separable SST-2 folder."""
    (glue_dir / "CoLA").mkdir()
    for split in ("train", "dev"):
        rows = [line.split("\t") for line in (glue_dir / "SST-2" / f"{split}.tsv").read_text().splitlines()[1:]]
        (glue_dir / "CoLA" / f"{split}.tsv").write_text("".join(f"src\t{y}\t\t{x}\n" for x, y in rows))


@pytest.mark.ray
@pytest.mark.slow
def test_two_finetunes_on_room_for_one_wait_quietly(ray_session, mlflow_uri, separable_cfg, capfd):
    """Each fine-tune needs both CPUs: the DAG queues the second behind the first with one line, and no error
    is logged."""
    import dataclasses
    from pathlib import Path

    _separable_cola(Path(separable_cfg.data.dir))
    ft = dataclasses.replace(separable_cfg.finetune, epochs=1, cpus_per_worker=2)
    summary = run(dataclasses.replace(separable_cfg, tasks=["sst2", "cola"], finetune=ft))
    assert {r["task"] for r in summary.rows} == {"sst2", "cola"}
    captured = capfd.readouterr()
    log = captured.out + captured.err
    assert "[run] finetune/cola: waiting for 2 CPUs held by finetune/sst2" in log
    assert "Error" not in log and "Traceback" not in log, log[-3000:]
