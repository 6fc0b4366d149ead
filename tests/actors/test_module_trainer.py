"""ModuleTrainer used directly (plain class) and as Ray actors pinned to (fake) GPUs."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from actors import fleet
from actors.module_trainer import ModuleTrainer, TrainerSettings
from pipelines import calibration
from pipelines.cluster import actor_resources, spread_placement, worker_resources
from pipelines.config import MremConfig
from pipelines.tracking import RunLogger
from tests.crafted import crafted_pickle

pytestmark = pytest.mark.ray


def _cache(teacher, data, folder, k: int, n: int):
    """Calibration shards of `teacher` for a K-module split, written to `folder` and put into the object store."""
    calibration.record(teacher, "sst2", data, k, n, folder, shard_size=64)
    return calibration.load_into_store(folder)


def _trainer(teacher, cache, spec, work_dir, steps, logger=None, fed=False, **extra):
    settings = TrainerSettings(steps=steps, batch_size=16, lr=1e-4, lr_quant=1e-3, teacher_forcing_steps=0,
                               checkpoint_every=10, eval_samples=64, log_every=5, **extra)
    return ModuleTrainer(spec, cache.layout, teacher, "w2a8", settings, cache.boundaries[spec.index],
                         cache.boundaries[0],
                         cache.num_samples, cache.shard_size, str(work_dir), logger=logger, fed_by_predecessor=fed)


class _Recorder:
    def __init__(self):
        self.logged: list[tuple[int, dict]] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((step, metrics))


def test_training_lowers_the_module_error_below_rtn_and_resumes(ray_session, tiny_teacher, tiny_data, tmp_path):
    cache = _cache(tiny_teacher, tiny_data, tmp_path / "acts", 2, 128)
    logger = _Recorder()
    trainer = _trainer(tiny_teacher, cache, cache.specs[1], tmp_path / "work", steps=20, logger=logger)
    stats = trainer.train()
    # initial_error is the RTN starting point: min-max weights, calibrated activation ranges
    assert stats["final_error"] < stats["initial_error"]
    assert stats["steps"] == 20 and stats["resumed_from_step"] == 0 and not stats["restarted"]
    assert [step for step, _ in logger.logged] == [5, 10, 15, 20] and "loss" in logger.logged[0][1]

    again = _trainer(tiny_teacher, cache, cache.specs[1], tmp_path / "work", steps=30)  # same work dir: resumes
    assert again.step == 20 and again.resumed_from == 20
    more = again.train()
    assert more["steps"] == 30 and more["initial_error"] == stats["initial_error"]


def test_module_checkpoints_are_not_unpickled(ray_session, tiny_teacher, tiny_data, tmp_path):
    """A crafted module checkpoint whose unpickling would create a file is refused, not executed."""
    cache = _cache(tiny_teacher, tiny_data, tmp_path / "acts", 2, 64)
    marker = crafted_pickle(tmp_path / "work" / "module1" / "state.pt")
    with pytest.raises(pickle.UnpicklingError):
        _trainer(tiny_teacher, cache, cache.specs[1], tmp_path / "work", steps=5)
    assert not marker.exists()


class _Killed(Exception):
    pass


def test_a_resumed_module_trains_exactly_as_an_uninterrupted_one(ray_session, tiny_teacher, tiny_data, tmp_path,
                                                                   monkeypatch):
    """Killed after step 25 (checkpoint at 20), a module resumes with the same batches and dropout stream."""
    import torch

    from actors import module_trainer

    cache = _cache(tiny_teacher, tiny_data, tmp_path / "acts", 2, 128)
    whole = _trainer(tiny_teacher, cache, cache.specs[1], tmp_path / "whole", steps=30, student_dropout=True)
    whole.train()

    def die_at_25(site: str, step: int = 0) -> None:
        if step == 25:
            raise _Killed(site)

    monkeypatch.setattr(module_trainer.faults, "point", die_at_25)
    with pytest.raises(_Killed):
        _trainer(tiny_teacher, cache, cache.specs[1], tmp_path / "cut", steps=30, student_dropout=True).train()
    monkeypatch.undo()
    resumed = _trainer(tiny_teacher, cache, cache.specs[1], tmp_path / "cut", steps=30, student_dropout=True)
    assert resumed.resumed_from == 20
    resumed.train()
    got, want = resumed.student.state_dict(), whole.student.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert resumed.losses == whole.losses


@pytest.mark.parametrize("dropout", [False, True])
def test_student_dropout_is_off_unless_asked_for(ray_session, tiny_teacher, tiny_data, tmp_path, dropout):
    cache = _cache(tiny_teacher, tiny_data, tmp_path / "acts", 2, 64)
    trainer = _trainer(tiny_teacher, cache, cache.specs[1], tmp_path / "w", steps=1, student_dropout=dropout)
    idx = np.arange(16)
    outs = [trainer._loss(idx, None, 1.0)[1].detach() for _ in range(2)]
    assert trainer.student.training  # quantizers still train (stochastic rounding, LSQ)
    # without dropout the student's training outputs (pushed to its MREM-P successor) are deterministic
    assert (not dropout) == bool((outs[0] == outs[1]).all())


def test_sequential_input_comes_from_the_predecessor(ray_session, tiny_teacher, tiny_data, tmp_path):
    cache = _cache(tiny_teacher, tiny_data, tmp_path / "acts", 2, 128)
    first = _trainer(tiny_teacher, cache, cache.specs[0], tmp_path / "w", steps=5)
    first.train()
    refs = first.propagate()
    assert len(refs) == len(cache.boundaries[1])
    second = _trainer(tiny_teacher, cache, cache.specs[1], tmp_path / "w", steps=5)
    second.set_predecessor_outputs(refs)
    idx, pred = second._next_input(np.random.default_rng(0))
    teacher_in = second.inputs.rows(idx, "hidden")
    assert pred.shape == teacher_in.shape and not np.allclose(pred, teacher_in)  # quantized, not teacher
    assert second.lam(0) == 0.0


def test_four_actors_get_distinct_fake_gpus(ray_fake_gpus, tiny_teacher, tiny_data, tmp_path):
    cache = _cache(tiny_teacher, tiny_data, tmp_path / "acts", 4, 64)
    res = worker_resources("auto")
    pg = spread_placement(res, 4, timeout_s=60)
    trainers = []
    try:
        trainers = fleet.launch(cache.specs, tiny_teacher, "w4a8", TrainerSettings(), cache, str(tmp_path / "w"),
                                "gpus", "parallel", res.as_options(), pg, [None] * 4, res.torch_device)
        where = ray_fake_gpus.get([t.placement.remote() for t in trainers])
    finally:
        fleet.stop(trainers)
        ray_fake_gpus.util.remove_placement_group(pg)
    gpu_ids = [w["gpu_ids"] for w in where]
    assert all(len(g) == 1 for g in gpu_ids) and len({g[0] for g in gpu_ids}) == 4
    assert {w["device"] for w in where} == {"cpu"}  # logical GPUs, no CUDA here: tensors stay on the CPU


def test_two_actors_share_one_gpu_at_half_a_gpu_each(ray_one_fake_gpu, tiny_teacher, tiny_data, tmp_path):
    """mrem.gpus_per_actor=0.5 on a node with one GPU: both module actors are placed at once, on the same GPU;
    with a whole GPU each, the second cannot be placed."""
    import torch

    cache = _cache(tiny_teacher, tiny_data, tmp_path / "acts", 2, 64)
    res = actor_resources(MremConfig(use_gpu="auto", gpus_per_actor=0.5))
    assert res.use_gpu and res.as_options() == {"num_cpus": 1, "num_gpus": 0.5}
    pg = spread_placement(res, 2, timeout_s=60)
    trainers = []
    try:
        trainers = fleet.launch(cache.specs, tiny_teacher, "w4a8", TrainerSettings(), cache, str(tmp_path / "w"),
                                "half", "parallel", res.as_options(), pg, [None] * 2, res.torch_device)
        where = ray_one_fake_gpu.get([t.placement.remote() for t in trainers])  # both alive, each answering
        assert ray_one_fake_gpu.available_resources().get("GPU", 0) == 0  # the one GPU is held by the two halves
    finally:
        fleet.stop(trainers)
        ray_one_fake_gpu.util.remove_placement_group(pg)
    assert [w["gpu_ids"] for w in where] == [["0"], ["0"]] and len({w["node_id"] for w in where}) == 1
    assert {w["device"] for w in where} == {"cuda" if torch.cuda.is_available() else "cpu"}
    with pytest.raises(TimeoutError, match="could not place them"):
        spread_placement(actor_resources(MremConfig(use_gpu="auto")), 2, timeout_s=2)


def test_run_logger_travels_to_actors_and_logs_there(mlflow_uri):
    import mlflow

    run_id = mlflow.MlflowClient(mlflow_uri).create_run("0").info.run_id
    logger = RunLogger(mlflow_uri, run_id)
    logger.log({"loss": 1.0}, 1)  # its client exists now; a copy must still pickle
    copy = pickle.loads(pickle.dumps(logger))
    copy.log({"loss": 0.5}, 2)
    history = mlflow.MlflowClient(mlflow_uri).get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5)]


def test_a_converging_module_stops_on_its_held_out_loss(ray_session, tiny_teacher, tiny_data, tmp_path):
    cache = _cache(tiny_teacher, tiny_data, tmp_path / "acts", 2, 128)
    logger = _Recorder()
    trainer = _trainer(tiny_teacher, cache, cache.specs[1], tmp_path / "w", steps=2000, logger=logger, converge=True,
                       min_steps=10, check_every=5, patience=2, tolerance=0.05, holdout=32)
    drawn = []
    real_batch = trainer._batch
    trainer._batch = lambda idx: drawn.append(np.asarray(idx)) or real_batch(idx)
    stats = trainer.train()
    assert stats["stop_reason"] == "converged" and stats["steps"] < 2000 and stats["lr_factor"] == pytest.approx(0.1)
    # the rates held until the plateau lowered them: no decay over the 2000-step budget
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([1e-5, 1e-4])
    curve = stats["heldout_curve"]
    assert [s for s, _ in curve] == list(range(10, stats["steps"] + 1, 5))  # a check every 5 steps from step 10
    assert [step for step, m in logger.logged if "heldout_loss" in m] == [s for s, _ in curve]
    held = [i for idx in drawn for i in idx if i >= 96]
    trained = {len(idx) for idx in drawn} == {16, 32}  # training batches of 16, held-out chunks of 32
    assert trained and all(len(idx) == 32 for idx in drawn if idx.max() >= 96) and held  # held-out rows only checked
    again = _trainer(tiny_teacher, cache, cache.specs[1], tmp_path / "w", steps=2000, converge=True, min_steps=10,
                     check_every=5, patience=2, tolerance=0.05, holdout=32)
    assert again.train()["steps"] == stats["steps"] and again.stop_reason == "converged"  # a restart stays stopped


@pytest.mark.parametrize("arrives_at, settle, steps, final_from", [
    (15, 15, 30, 15),    # handed over late: the budget stretches until 15 steps trained on the final outputs
    (5, 15, 20, 5),      # handed over early enough: the budget holds
    (15, 0, 20, 15),     # no settling asked for (an explicit mrem.steps)
    (None, 15, 40, None),  # never handed over: twice the budget at most
])
def test_a_fed_module_trains_on_its_predecessors_final_outputs_before_the_budget_stops_it(
        ray_session, tiny_teacher, tiny_data, tmp_path, arrives_at, settle, steps, final_from):
    cache = _cache(tiny_teacher, tiny_data, tmp_path / "acts", 2, 64)
    trainer = _trainer(tiny_teacher, cache, cache.specs[1], tmp_path / "w", steps=20, fed=True, converge=True,
                       min_steps=1000, holdout=16, settle_steps=settle, first_push_s=0.01, wait_s=0.01)
    real_step = trainer._step

    def step(rng):
        if trainer.step == arrives_at:  # the predecessor's final outputs (its inputs stand in for them)
            trainer.set_predecessor_outputs(cache.boundaries[1])
        real_step(rng)

    trainer._step = step
    stats = trainer.train()
    assert (stats["steps"], stats["stop_reason"], stats["final_outputs_from_step"]) == (steps, "budget", final_from)


def test_without_convergence_a_module_trains_its_steps(ray_session, tiny_teacher, tiny_data, tmp_path):
    cache = _cache(tiny_teacher, tiny_data, tmp_path / "acts", 2, 64)
    stats = _trainer(tiny_teacher, cache, cache.specs[0], tmp_path / "w", steps=12).train()
    assert stats["steps"] == 12 and stats["stop_reason"] == "steps" and stats["heldout_curve"] == []
