"""The driver DAG: stage plan, keys, resume, --force, report, and bad configs failing before work."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.config import load_config
from pipelines.dag import forced, keys
from pipelines.report import comparison_rows, family, report
from pipelines.runner import run
from pipelines.stages import plan as build
from pipelines.store import StageStore

ROOT = Path(__file__).resolve().parents[2]


def tiny_dict(glue_dir, cache_dir, out) -> dict:
    """Every branch of the DAG on tiny-bert, small enough for CI."""
    return {
        "model": "tiny-bert", "tasks": ["sst2"], "output_dir": str(out), "experiment": "dag-test",
        "data": {"source": "dir", "dir": str(glue_dir), "max_length": 16, "train_examples": 128,
                 "eval_examples": 64, "cache_dir": cache_dir},
        "finetune": {"epochs": 1, "batch_size": 32, "lr": 1e-3, "log_every": 100},
        "rtn": {"quant": ["w8a8", "w4a8"], "calib_samples": 32},
        "mrem": {"quant": ["w4a8"], "steps": 6, "batch_size": 8, "calib_samples": 32, "shard_size": 16,
                 "calib_batch_size": 32, "checkpoint_every": 3, "log_every": 3, "eval_samples": 16},
        "prequant": {"quant": ["w4"], "methods": ["prequant"], "lr": 1e-3},
    }


def tiny_cfg(tmp_path, overrides=()):
    data = tiny_dict(tmp_path / "glue", str(tmp_path / "tok"), tmp_path / "run")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, list(overrides)), path


# ---------------------------------------------------------------- plan and keys (no Ray)

def test_plan_has_every_branch_with_its_dependencies(tmp_path):
    cfg, _ = tiny_cfg(tmp_path)
    stages = {s.name: s for s in build(cfg)}
    assert set(stages) == {"finetune/sst2", "evaluate/sst2/fp", "rtn/sst2/w8a8", "rtn/sst2/w4a8", "calibrate/sst2",
                           "mrem/sst2/w4a8-parallel", "prequant-quantize/w4a16/weight",
                           "prequant/sst2/prequant-w4a16", "report"}
    assert set(stages["report"].deps) == set(stages) - {"report", "finetune/sst2", "calibrate/sst2",
                                                        "prequant-quantize/w4a16/weight"}
    assert stages["mrem/sst2/w4a8-parallel"].deps == ("finetune/sst2", "calibrate/sst2")
    assert stages["prequant/sst2/prequant-w4a16"].deps == ("prequant-quantize/w4a16/weight",)
    assert stages["finetune/sst2"].deps == ()
    seen: set[str] = set()
    for st in build(cfg):  # dependencies come first
        assert set(st.deps) <= seen
        seen.add(st.name)


def test_plan_fans_out_over_tasks_and_configs(tmp_path):
    cfg, _ = tiny_cfg(tmp_path, ["tasks=[sst2,rte]", "mrem.quant=[w4a8,w2a8]"])
    names = [s.name for s in build(cfg)]
    assert sum(n.startswith("mrem/") for n in names) == 4
    assert sum(n.startswith("prequant-quantize/") for n in names) == 1  # task-agnostic: shared by both tasks
    assert {"prequant/sst2/prequant-w4a16", "prequant/rte/prequant-w4a16"} <= set(names)


def test_keys_follow_inputs(tmp_path):
    cfg, _ = tiny_cfg(tmp_path)
    before = keys(cfg, build(cfg))
    assert keys(cfg, build(cfg)) == before  # deterministic
    cfg2, _ = tiny_cfg(tmp_path, ["finetune.lr=0.002"])
    after = keys(cfg2, build(cfg2))
    changed = {n for n in before if before[n] != after[n]}
    # the teacher changed: everything downstream of it, but not the task-agnostic prequant model
    assert {"finetune/sst2", "evaluate/sst2/fp", "rtn/sst2/w4a8", "calibrate/sst2",
            "mrem/sst2/w4a8-parallel"} <= changed
    assert "prequant-quantize/w4a16/weight" not in changed
    cfg3, _ = tiny_cfg(tmp_path, ["finetune.log_every=7"])  # logging does not change results
    assert keys(cfg3, build(cfg3)) == before


def test_force_reaches_descendants(tmp_path):
    cfg, _ = tiny_cfg(tmp_path)
    stages = build(cfg)
    assert forced(stages, ["calibrate"]) == {"calibrate/sst2", "mrem/sst2/w4a8-parallel", "report"}
    assert forced(stages, ["rtn/sst2/w4a8"]) == {"rtn/sst2/w4a8", "report"}
    assert "prequant-quantize/w4a16/weight" not in forced(stages, ["finetune"])
    assert len(forced(stages, ["finetune"])) == 7  # with the report


# ---------------------------------------------------------------- store

@pytest.mark.parametrize("remote", [False, True])
def test_store_records_and_uploads_outputs(tmp_path, remote):
    local = tmp_path / "local"
    (local / "sst2" / "rtn").mkdir(parents=True)
    (local / "sst2" / "rtn" / "model.bin").write_bytes(b"\x01\x02")
    run_dir = (tmp_path / "bucket").as_uri() if remote else str(local)
    store = StageStore(run_dir, local)
    assert store.done("rtn/sst2/w4a8", "k1") is None
    store.commit("rtn/sst2/w4a8", "k1", {"row": {"value": 1.0}}, "sst2/rtn")
    assert store.done("rtn/sst2/w4a8", "k1")["row"] == {"value": 1.0}
    assert store.done("rtn/sst2/w4a8", "k2") is None  # other inputs: not complete
    if remote:
        assert (tmp_path / "bucket" / "sst2" / "rtn" / "model.bin").read_bytes() == b"\x01\x02"
        fresh = tmp_path / "other_machine"
        StageStore(run_dir, fresh).done("rtn/sst2/w4a8", "k1")  # a resume elsewhere downloads the outputs
        assert (fresh / "sst2" / "rtn" / "model.bin").read_bytes() == b"\x01\x02"


# ---------------------------------------------------------------- report

ROWS = [
    {"task": "sst2", "method": "fp", "bits": 32, "metric": "accuracy", "value": 90.0, "model_MB": 80.0},
    {"task": "sst2", "method": "rtn-w4a8", "bits": 4, "metric": "accuracy", "value": 85.5, "model_MB": 20.0},
    {"task": "sst2", "method": "mrem-parallel-w4a8", "bits": 4, "metric": "accuracy", "value": 89.0},
    {"task": "sst2", "method": "rtn-w8a8", "bits": 8, "metric": "accuracy", "value": 89.9},
]


def test_report_table_csv_and_plot(tmp_path):
    rows = comparison_rows(ROWS)
    assert [r["method"] for r in rows] == ["fp", "rtn-w8a8", "mrem-parallel-w4a8", "rtn-w4a8"]
    assert {r["method"]: r["drop_vs_fp"] for r in rows} == {"fp": 0, "rtn-w8a8": 0.1, "mrem-parallel-w4a8": 1.0,
                                                           "rtn-w4a8": 4.5}
    rep = report(ROWS, tmp_path)
    lines = Path(rep.csv).read_text().splitlines()
    assert lines[0].split(",")[:5] == ["task", "method", "bits", "metric", "value"] and len(lines) == 5
    assert Path(rep.plot).read_bytes()[:4] == b"\x89PNG"
    assert "| sst2 | rtn-w4a8 | 4 |" in Path(rep.markdown).read_text()
    assert family("mrem-parallel-w2a8") == "mrem-parallel" and family("prequant-w4a16") == "prequant"
    assert family("rtn-w8a8@onnxruntime") == "rtn@onnxruntime"


def test_report_shows_each_tasks_majority_class_floor_last(tmp_path):
    rep = report(ROWS, tmp_path, floors={"sst2": ("accuracy", 50.92)})
    last = rep.rows[-1]
    assert (last["method"], last["value"], last["drop_vs_fp"]) == ("majority-class", 50.92, 39.08)
    assert [r["method"] for r in rep.rows[:-1]] == [r["method"] for r in comparison_rows(ROWS)]
    assert "| sst2 | majority-class |" in Path(rep.markdown).read_text()
    assert Path(rep.plot).read_bytes()[:4] == b"\x89PNG"  # drawn as a reference line, not a bits point


# ---------------------------------------------------------------- bad configs fail before work

@pytest.mark.parametrize("args, message", [
    (["--set", "mremm.steps=3"], "unknown config key 'mremm'"),
    (["--force", "distill"], "--force 'distill' names no stage"),
    (["--set", "data.dir=/nonexistent/glue"], "data.dir=/nonexistent/glue: no such folder"),
    (["--set", "finetune.cpus_per_worker=64"], "the largest node"),
    (["--set", "mrem.use_gpu=true"], "mrem.use_gpu=true but no node"),
])
def test_bad_run_fails_before_any_stage(tmp_path, separable_glue, args, message):
    _, path = tiny_cfg(tmp_path, [])
    data = yaml.safe_load(path.read_text())
    data["data"]["dir"] = str(separable_glue)
    path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'ml.db'}", "RAY_ADDRESS": ""}
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(path), *args], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr
    assert not (tmp_path / "run" / "stages").exists()  # no stage ran


# ---------------------------------------------------------------- the DAG end to end

def _stage_runs(experiment: str) -> dict[str, list[str]]:
    import mlflow

    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children: dict[str, list[str]] = {}
    for r in runs:
        pid = r.data.tags.get("mlflow.parentRunId")
        if pid:
            children.setdefault(pid, []).append(r.data.tags.get("mlflow.runName"))
    return {p.info.run_id: sorted(children.get(p.info.run_id, [])) for p in parents}


def _runs(experiment: str) -> dict[str, tuple[str, str | None, str]]:
    """run id -> (status, parent run id or None, run name) of every run of `experiment`."""
    import mlflow

    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    return {r.info.run_id: (r.info.status, r.data.tags.get("mlflow.parentRunId"), r.info.run_name) for r in runs}


@pytest.mark.ray
@pytest.mark.slow
def test_dag_runs_skips_when_complete_and_forces(tmp_path, ray_session, mlflow_uri, separable_glue, cache_dir):
    cfg, _ = tiny_cfg(tmp_path, [f"data.dir={separable_glue}", f"data.cache_dir={cache_dir}"])
    first = run(cfg)
    methods = {r["method"] for r in first.rows}
    assert methods == {"fp", "rtn-w8a8", "rtn-w4a8", "mrem-parallel-w4a8", "prequant-w4a16"}
    assert first.skipped == [] and first.failed == {}
    out = Path(first.output_dir)
    for name in ("report.md", "report.csv", "accuracy_vs_bits.png", "results.json"):
        assert (out / name).exists(), name
    assert "| sst2 | majority-class |" in (out / "report.md").read_text()
    stage_runs = _stage_runs("dag-test")[first.parent_run_id]
    assert {"finetune/sst2", "evaluate/sst2/fp", "rtn/sst2/w4a8", "mrem/sst2/w4a8-parallel"} <= set(stage_runs)
    assert any(name.startswith("prequant/sst2/") for name in stage_runs)

    second = run(cfg)  # same command again: nothing recomputed, same results
    assert sorted(second.skipped) == sorted(s.name for s in build(cfg) if s.kind != "report")
    assert [(r["method"], r["value"]) for r in second.rows] == [(r["method"], r["value"]) for r in first.rows]
    assert _stage_runs("dag-test")[second.parent_run_id] == ["report"]  # only the report is redone, from records

    third = run(cfg, force=["rtn"])
    assert sorted(set(s.name for s in build(cfg)) - set(third.skipped)) == ["report", "rtn/sst2/w4a8", "rtn/sst2/w8a8"]


@pytest.mark.ray
@pytest.mark.slow
def test_killed_driver_resumes_without_recomputing(tmp_path, ray_session, mlflow_uri, separable_glue, cache_dir):
    """`plmq run` dies once the fine-tune is recorded (pipelines.faults); the re-run keeps it, completes the rest
    and ends the dead invocation's MLflow runs as KILLED."""
    from pipelines import faults

    cfg, path = tiny_cfg(tmp_path, [f"data.dir={separable_glue}", f"data.cache_dir={cache_dir}"])
    data = yaml.safe_load(path.read_text())
    data["data"].update(dir=str(separable_glue), cache_dir=cache_dir)
    path.write_text(yaml.safe_dump(data))
    (tmp_path / "faults").mkdir()
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           faults.ENV: "driver.finetune/sst2@0", faults.DIR_ENV: str(tmp_path / "faults")}
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == faults.EXIT_CODE, out.stderr[-2000:]
    record = Path(cfg.output_dir) / "stages" / "finetune__sst2.json"
    finished_at = json.loads(record.read_text())["finished_at"]
    summary = run(cfg)
    assert "finetune/sst2" in summary.skipped
    assert json.loads(record.read_text())["finished_at"] == finished_at  # not recomputed
    assert {r["method"] for r in summary.rows} >= {"fp", "rtn-w4a8", "mrem-parallel-w4a8"}
    runs = _runs("dag-test")
    assert "RUNNING" not in {status for status, _, _ in runs.values()}
    killed = [rid for rid, (status, parent, _) in runs.items() if parent is None and status == "KILLED"]
    assert len(killed) == 1 and killed[0] != summary.parent_run_id


@pytest.mark.ray
@pytest.mark.slow
def test_a_dead_stage_process_fails_its_stage_only(tmp_path, ray_session, mlflow_uri, separable_glue, cache_dir,
                                                   inject_faults):
    """The process of stage rtn/sst2/w8a8 dies inside its MLflow run: that stage fails (its run ends FAILED), the
    others complete; the same command again runs only what failed."""
    from pipelines.runner import StageFailure

    cfg, _ = tiny_cfg(tmp_path, [f"data.dir={separable_glue}", f"data.cache_dir={cache_dir}", "mrem.quant=[]",
                                 "prequant.quant=[]"])
    fired = inject_faults("stage.rtn/sst2/w8a8@0")
    with pytest.raises(StageFailure, match="rtn/sst2/w8a8"):
        run(cfg)
    assert fired() == ["stage.rtn/sst2/w8a8@0"]
    runs = _runs("dag-test")
    by_name = {name: status for status, parent, name in runs.values() if parent}
    assert by_name["rtn/sst2/w8a8"] == "FAILED" and by_name["rtn/sst2/w4a8"] == "FINISHED"
    assert "RUNNING" not in {status for status, _, _ in runs.values()}
    again = run(cfg)
    assert sorted(set(s.name for s in build(cfg)) - set(again.skipped)) == ["report", "rtn/sst2/w8a8"]


def test_dry_run_lists_the_plan_without_running(tmp_path):
    _, path = tiny_cfg(tmp_path)
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(path), "--dry-run"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "mrem/sst2/w4a8-parallel" in out.stdout and "after finetune/sst2, calibrate/sst2" in out.stdout
    assert not (tmp_path / "run").exists()
