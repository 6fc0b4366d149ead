"""ModuleTrainer used directly (plain class) and as Ray actors pinned to (fake) GPUs."""
from __future__ import annotations

import numpy as np
import pytest

from actors.module_trainer import ModuleTrainer, TrainerSettings
from pipelines.calibrate import calibrate
from pipelines.config import MremConfig
from pipelines.mrem import launch_trainers
from pipelines.partition import split_layers

pytestmark = pytest.mark.ray


def _trainer(teacher, cache, spec, work_dir, steps, **extra):
    settings = TrainerSettings(steps=steps, batch_size=16, lr=1e-4, lr_quant=1e-3, teacher_forcing_steps=0,
                               checkpoint_every=10, eval_samples=64, **extra)
    return ModuleTrainer(spec, teacher, "w2a8", settings, cache.boundaries[spec.index], cache.boundaries[0],
                         cache.num_samples, cache.shard_size, str(work_dir))


def test_training_lowers_the_module_error_below_rtn_and_resumes(ray_session, tiny_teacher, tiny_data, tmp_path):
    teacher, data = tiny_teacher, tiny_data
    specs = split_layers(4, 2)
    cache = calibrate(teacher, "sst2", data, specs, n=128, shard_size=64)
    trainer = _trainer(teacher, cache, specs[1], tmp_path / "work", steps=20)
    stats = trainer.train()
    # initial_error is the RTN starting point: min-max weights, calibrated activation ranges
    assert stats["final_error"] < stats["initial_error"]
    assert stats["steps"] == 20 and stats["resumed_from_step"] == 0 and not stats["restarted"]

    again = _trainer(teacher, cache, specs[1], tmp_path / "work", steps=30)  # same work dir: resumes
    assert again.step == 20 and again.resumed_from == 20
    more = again.train()
    assert more["steps"] == 30 and more["initial_error"] == stats["initial_error"]


@pytest.mark.parametrize("dropout", [False, True])
def test_student_dropout_is_off_unless_asked_for(ray_session, tiny_teacher, tiny_data, tmp_path, dropout):
    specs = split_layers(4, 2)
    cache = calibrate(tiny_teacher, "sst2", tiny_data, specs, n=64, shard_size=64)
    trainer = _trainer(tiny_teacher, cache, specs[1], tmp_path / "w", steps=1, student_dropout=dropout)
    idx = np.arange(16)
    outs = [trainer._loss(idx, None, 1.0)[1].detach() for _ in range(2)]
    assert trainer.student.training  # quantizers still train (stochastic rounding, LSQ)
    # without dropout the student's training outputs (pushed to its MREM-P successor) are deterministic
    assert (not dropout) == bool((outs[0] == outs[1]).all())


def test_sequential_input_comes_from_the_predecessor(ray_session, tiny_teacher, tiny_data, tmp_path):
    teacher, data = tiny_teacher, tiny_data
    specs = split_layers(4, 2)
    cache = calibrate(teacher, "sst2", data, specs, n=128, shard_size=64)
    first = _trainer(teacher, cache, specs[0], tmp_path / "w", steps=5)
    first.train()
    refs = first.propagate()
    assert len(refs) == len(cache.boundaries[1])
    second = _trainer(teacher, cache, specs[1], tmp_path / "w", steps=5)
    second.set_predecessor_outputs(refs)
    idx, pred = second._next_input(np.random.default_rng(0))
    teacher_in = second.inputs.rows(idx, "hidden")
    assert pred.shape == teacher_in.shape and not np.allclose(pred, teacher_in)  # quantized, not teacher
    assert second.lam(0) == 0.0


def test_four_actors_get_distinct_fake_gpus(ray_fake_gpus, tiny_teacher, tiny_data, tmp_path):
    teacher, data = tiny_teacher, tiny_data
    specs = split_layers(4, 4)
    cache = calibrate(teacher, "sst2", data, specs, n=64, shard_size=64)
    cfg = MremConfig(quant=["w4a8"], use_gpu="auto", modules=4)
    trainers, pg = launch_trainers(specs, teacher, "w4a8", cfg, cache, tmp_path / "w", [None] * 4, None)
    try:
        where = ray_fake_gpus.get([t.placement.remote() for t in trainers])
    finally:
        for t in trainers:
            ray_fake_gpus.kill(t)
        ray_fake_gpus.util.remove_placement_group(pg)
    gpu_ids = [w["gpu_ids"] for w in where]
    assert all(len(g) == 1 for g in gpu_ids) and len({g[0] for g in gpu_ids}) == 4
    assert {w["device"] for w in where} == {"cpu"}  # logical GPUs, no CUDA here: tensors stay on the CPU
