"""Stages `calibrate` and `mrem`: plans, modes, two nodes, an actor killed mid-training, ObjectRefs only,
one calibration, module checkpoints keyed by the stage key."""
from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest

from actors import fleet
from pipelines import calibration, checkpoints, models
from pipelines.config import DataConfig, MremConfig, RunConfig
from pipelines.stages import calibrate, mrem
from pipelines.stages.base import Context
from pipelines.store import stage_key

slow = [pytest.mark.ray, pytest.mark.slow]


def small(data=None, **kw) -> RunConfig:
    base = {"quant": ["w4a8"], "modules": 2, "steps": 30, "batch_size": 16, "lr": 1e-4, "calib_samples": 128,
            "shard_size": 64, "checkpoint_every": 10, "log_every": 10, "eval_samples": 64}
    return RunConfig(model="tiny-bert", tasks=["sst2"], data=data or DataConfig(), mrem=MremConfig(**{**base, **kw}))


def calibrated(cfg: RunConfig, teacher: str, root, key: str = "c1", force: bool = False) -> dict:
    """Run the calibrate stage of a single-verb plan; returns the upstream mapping the mrem stage reads."""
    stage = calibrate.plan(cfg, teacher)[0]
    result = calibrate.run(cfg, stage, {}, Context(root=root, key=key, force=force))
    return {stage.name: dataclasses.asdict(result)}


def run_mrem(cfg: RunConfig, teacher: str, root, upstream: dict, key: str = "k1", **ctx):
    stage = mrem.plan(cfg, teacher)[0]
    return mrem.run(cfg, stage, upstream, Context(root=root, key=key, **ctx))


def test_plan_from_a_config_and_from_a_checkpoint():
    cfg = small(quant=["w4a8", "w2a8"], mode="sequential")
    assert [(s.name, s.deps) for s in mrem.plan(cfg)] == [
        ("mrem/sst2/w4a8-sequential", ("finetune/sst2", "calibrate/sst2")),
        ("mrem/sst2/w2a8-sequential", ("finetune/sst2", "calibrate/sst2"))]
    assert [(s.name, s.deps) for s in calibrate.plan(cfg)] == [("calibrate/sst2", ("finetune/sst2",))]
    single = calibrate.plan(cfg, "ckpt") + mrem.plan(cfg, "ckpt")  # `plmq mrem CKPT`: no fine-tuning
    assert [(s.name, s.deps, s.checkpoint) for s in single] == [
        ("calibrate/sst2", (), "ckpt"), ("mrem/sst2/w4a8-sequential", ("calibrate/sst2",), "ckpt"),
        ("mrem/sst2/w2a8-sequential", ("calibrate/sst2",), "ckpt")]
    assert mrem.plan(small(quant=[])) == [] and calibrate.plan(small(quant=[])) == []


def test_fragments_hold_what_decides_the_result():
    cfg, st = small(), mrem.plan(small())[0]
    quiet = small(log_every=1, max_restarts=0, placement_timeout_s=1.0, cache_dir="/elsewhere", gpus_per_actor=0.5)
    assert mrem.fragment(cfg, st) == mrem.fragment(quiet, st)
    assert mrem.fragment(cfg, st) != mrem.fragment(small(steps=31), st)
    cal = calibrate.plan(cfg)[0]
    assert calibrate.fragment(cfg, cal) == calibrate.fragment(small(steps=31, lr=1.0), cal)  # training only
    assert calibrate.fragment(cfg, cal) != calibrate.fragment(small(modules=4), cal)
    assert calibrate.fragment(small(mode="rem", modules=None), cal)["modules"] == 1
    with pytest.raises(ValueError, match="unresolved"):  # K is decided once, in the driver, before any stage runs
        calibrate.run(small(modules=None), cal, {}, Context(root=".", key="k"))


@pytest.mark.parametrize("mode", ["parallel", "sequential", "rem"])
@pytest.mark.ray
@pytest.mark.slow
def test_every_mode_yields_an_evaluable_packed_model(ray_session, tiny_teacher, tiny_data, tmp_path, mode, mlflow_uri):
    import mlflow

    cfg = small(tiny_data, quant=["w2a8"], mode=mode, modules=None if mode == "rem" else 2)
    client = mlflow.MlflowClient(mlflow_uri)
    stage_run = client.create_run(client.create_experiment("mrem-test")).info.run_id
    result = run_mrem(cfg, tiny_teacher, tmp_path, calibrated(cfg, tiny_teacher, tmp_path), run_id=stage_run,
                      tracking_uri=mlflow_uri)
    info = result.info
    assert info["modules"] == (1 if mode == "rem" else 2) and result.resources["cpus"] == info["modules"]
    assert 0.0 <= result.row["value"] <= 100.0 and result.row["bits"] == 1.58 and info["packed_bytes"] > 0
    assert checkpoints.read_meta(result.checkpoint)["format"] == "packed"
    # every module's output, fed by its quantized predecessors, is closer to the teacher than RTN's
    assert len(info["chain_errors"]) == info["modules"]
    assert all(m < r for m, r in zip(info["chain_errors"], info["rtn_chain_errors"])), info
    assert result.metrics["module0_error"] == info["chain_errors"][0]
    # one nested run per module under the stage's run, holding the loss curve its actor logged
    modules = client.search_runs([client.get_run(stage_run).info.experiment_id],
                                 f"tags.mlflow.parentRunId = '{stage_run}'")
    assert len(modules) == info["modules"]
    assert all([m.step for m in client.get_metric_history(r.info.run_id, "loss")] == [10, 20, 30] for r in modules)
    if mode == "parallel":  # module 0 fed module 1 directly, actor to actor
        assert info["modules_stats"][0]["pushed_bytes"] > 0 and info["modules_stats"][1]["pulled_bytes"] > 0


@pytest.mark.ray
@pytest.mark.slow
def test_parallel_mrem_spreads_over_two_nodes(ray_two_nodes, tiny_teacher, tiny_data, tmp_path):
    cfg = small(tiny_data, steps=10)
    result = run_mrem(cfg, tiny_teacher, tmp_path, calibrated(cfg, tiny_teacher, tmp_path))
    assert len({s["node_id"] for s in result.info["modules_stats"]}) == 2


@pytest.mark.ray
@pytest.mark.slow
def test_killed_actor_restarts_from_its_checkpoint(ray_session, tiny_teacher, tiny_data, tmp_path, inject_faults):
    """Module 1's actor dies after step 25 (pipelines.faults); Ray restarts it, it resumes from step 20."""
    cfg = small(tiny_data, steps=60, checkpoint_every=10)
    upstream = calibrated(cfg, tiny_teacher, tmp_path)
    fired = inject_faults("mrem.module1@25")
    result = run_mrem(cfg, tiny_teacher, tmp_path, upstream)
    assert fired() == ["mrem.module1@25"]
    stats = result.info["modules_stats"]
    assert stats[1]["restarted"] and stats[1]["resumed_from_step"] == 20 and stats[1]["steps"] == 60
    assert not stats[0]["restarted"] and stats[0]["resumed_from_step"] == 0  # only the failed module was redone
    assert result.info["restarts"] == 1 and result.metrics["restarts"] == 1


@pytest.mark.ray
@pytest.mark.slow
def test_parallel_mrem_survives_losing_a_node(ray_nodes_to_lose, tiny_teacher, tiny_data, tmp_path, inject_faults):
    """Module 1's node is removed at its step 25 (its actor holds there: pipelines.faults) and a new node joins, as an
    autoscaler would add one: module 1 restarts on the new node from its step-20 checkpoint, module 0 is not redone,
    and the result matches an uninterrupted run's."""
    ray, cluster = ray_nodes_to_lose
    cfg = small(tiny_data, steps=60, checkpoint_every=10)
    upstream = calibrated(cfg, tiny_teacher, tmp_path)
    whole = run_mrem(cfg, tiny_teacher, tmp_path, upstream, key="k0")
    fired = inject_faults("mrem.module1@25:hold")
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["result"] = run_mrem(cfg, tiny_teacher, tmp_path, upstream)
        except BaseException as e:
            outcome["error"] = e

    stage = threading.Thread(target=train, daemon=True)  # the main thread moves nodes (Ray sets signal handlers)
    stage.start()
    while not fired() and stage.is_alive():  # the test's timeout bounds this wait
        time.sleep(0.2)
    lost = ray.get(ray.get_actor(fleet.trainer_name("k1", 1)).placement.remote())["node_id"]
    cluster.remove_node(next(n for n in cluster.worker_nodes if n.node_id == lost))
    cluster.add_node(num_cpus=1, object_store_memory=200 * 2**20)
    stage.join()
    result = outcome.get("result") or pytest.fail(f"the stage failed: {outcome.get('error')!r}")
    stats = result.info["modules_stats"]
    assert fired() == ["mrem.module1@25"] and lost not in {s["node_id"] for s in stats}
    assert stats[1]["restarted"] and stats[1]["resumed_from_step"] == 20 and stats[1]["steps"] == 60
    assert not stats[0]["restarted"] and stats[0]["resumed_from_step"] == 0
    # MREM-P's pushes make runs differ slightly (their timing decides module 1's inputs): compare with a margin
    for run in (result, whole):
        assert all(m < r for m, r in zip(run.info["chain_errors"], run.info["rtn_chain_errors"])), run.info
    assert abs(result.row["value"] - whole.row["value"]) <= 3.0, (result.row, whole.row)


@pytest.mark.ray
@pytest.mark.slow
def test_mrem_never_calibrates_and_the_driver_never_fetches_shards(ray_session, tiny_teacher, tiny_data, tmp_path,
                                                                  monkeypatch):
    import ray

    cfg = small(tiny_data, steps=5)
    upstream = calibrated(cfg, tiny_teacher, tmp_path)
    monkeypatch.setattr(calibration, "record", lambda *a, **k: pytest.fail("the mrem stage calibrated again"))
    put_refs, got = [], []
    real_put, real_get = ray.put, ray.get
    monkeypatch.setattr(ray, "put", lambda v, *a, **k: put_refs.append(real_put(v, *a, **k)) or put_refs[-1])

    def spy_get(refs, *a, **k):
        got.extend(refs if isinstance(refs, list) else [refs])
        return real_get(refs, *a, **k)

    monkeypatch.setattr(ray, "get", spy_get)
    run_mrem(cfg, tiny_teacher, tmp_path, upstream)
    assert len(put_refs) == 2 * 2, "the stage did not put the calibration folder's shards into the object store"
    assert not {r.hex() for r in put_refs} & {r.hex() for r in got if isinstance(r, ray.ObjectRef)}


@pytest.mark.ray
@pytest.mark.slow
def test_calibration_is_written_once_under_its_key(ray_session, tiny_teacher, tiny_data, tmp_path):
    cfg = small(tiny_data, calib_samples=100, cache_dir=str(tmp_path / "acts"))
    first = calibrated(cfg, tiny_teacher, tmp_path / "run1")["calibrate/sst2"]
    folder = tmp_path / "acts" / "c1"
    assert first["info"]["cache_dir"] == str(folder) and first["outputs"] is None  # outside the run folder
    assert not first["info"]["reused"] and first["info"]["modules"] == 2
    on_disk = calibration.read_shard(folder / "b1" / "s00001")
    again = calibrated(cfg, tiny_teacher, tmp_path / "run2")["calibrate/sst2"]  # another run, the same key
    assert again["info"]["reused"] and again["info"]["calib_bytes"] == first["info"]["calib_bytes"] > 0
    forced = calibrated(cfg, tiny_teacher, tmp_path / "run2", force=True)["calibrate/sst2"]
    assert not forced["info"]["reused"]
    cache = calibration.load_into_store(folder)
    assert [len(b) for b in cache.boundaries] == [2, 2] and cache.num_samples == 100
    assert [(s.start, s.end) for s in cache.specs] == [(0, 2), (2, 4)]
    stored = ray_session.get(cache.boundaries[1][1])
    assert np.array_equal(stored["hidden"], on_disk["hidden"])
    local = calibrated(small(tiny_data), tiny_teacher, tmp_path / "run3", key="c2")["calibrate/sst2"]
    assert local["outputs"] == "sst2/calibrate-c2"
    assert (tmp_path / "run3" / "sst2" / "calibrate-c2" / "meta.json").is_file()


def test_shards_hold_shard_size_rows_whatever_the_batch_size(tiny_teacher, tiny_data, tmp_path):
    """Readers find row i in shard i // shard_size: a calibration batch larger than a shard must be split."""
    calibration.record(tiny_teacher, "sst2", tiny_data, 2, 100, tmp_path / "c", batch_size=64, shard_size=16)
    for b in ("b0", "b1"):
        shards = sorted((tmp_path / "c" / b).iterdir())
        sizes = [len(next(iter(calibration.read_shard(s).values()))) for s in shards]
        assert sizes == [16] * 6 + [4]


@pytest.mark.ray
@pytest.mark.slow
def test_module_checkpoints_are_keyed_by_the_stage_key(ray_session, tiny_teacher, tiny_data, tmp_path):
    """The same key resumes the module checkpoints; --force and a new teacher in the same folder
    (whose weights change the calibrate stage's key, and so the mrem stage's) start afresh."""
    cfg = small(tiny_data, steps=10, checkpoint_every=5, mode="sequential")
    upstream = calibrated(cfg, tiny_teacher, tmp_path)
    def resumed(result):
        return [s["resumed_from_step"] for s in result.info["modules_stats"]]

    assert resumed(run_mrem(cfg, tiny_teacher, tmp_path, upstream)) == [0, 0]
    assert resumed(run_mrem(cfg, tiny_teacher, tmp_path, upstream)) == [10, 10]  # same key: resumed
    assert resumed(run_mrem(cfg, tiny_teacher, tmp_path, upstream, force=True)) == [0, 0]
    assert resumed(run_mrem(cfg, tiny_teacher, tmp_path, upstream, key="k2")) == [0, 0]
    cal, st = calibrate.plan(cfg, tiny_teacher)[0], mrem.plan(cfg, tiny_teacher)[0]

    def mrem_key():
        cal_key = stage_key("calibrate", calibrate.fragment(cfg, cal), [])
        return stage_key("mrem", mrem.fragment(cfg, st), [cal_key])

    before = mrem_key()
    tok = models.load_tokenizer("tiny-bert")
    checkpoints.save(models.load_classifier("tiny-bert", 2, seed=4), tok, tiny_teacher, {"task": "sst2"}, fmt="fp")
    assert mrem_key() != before


@pytest.mark.ray
@pytest.mark.slow
def test_parallel_modules_converge_on_their_predecessors_final_outputs(ray_session, tiny_teacher, tiny_data, tmp_path):
    """Module 1 stops only after module 0 handed over its final outputs and it trained on them for a while."""
    cfg = small(tiny_data, steps=None, max_passes=100, min_passes=1, check_every=5, patience=2, tolerance=0.05,
                holdout_samples=32)
    info = run_mrem(cfg, tiny_teacher, tmp_path, calibrated(cfg, tiny_teacher, tmp_path)).info
    first, second = info["modules_stats"]
    assert info["stop_reasons"] == ["converged", "converged"] and info["steps"] == [first["steps"], second["steps"]]
    assert first["steps"] < 600 == first["max_steps"]  # 100 passes over 96 rows in batches of 16
    assert first["final_outputs_from_step"] is None and second["final_outputs_from_step"] is not None
    assert second["steps"] >= second["final_outputs_from_step"] + 2 * 5
    assert all(m < r for m, r in zip(info["chain_errors"], info["rtn_chain_errors"])), info
