"""Stage `mrem` end to end: modes, two nodes, an actor killed mid-training, ObjectRefs only."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from pipelines.calibrate import calibrate
from pipelines.config import EvaluateConfig, MremConfig
from pipelines.mrem import mrem, plan, trainer_name, work_key
from pipelines.partition import split_layers

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def small(**kw) -> MremConfig:
    base = dict(steps=30, batch_size=16, lr=1e-4, calib_samples=128, shard_size=64, checkpoint_every=10,
                log_every=10, eval_samples=64)
    return MremConfig(**{**base, **kw})


@pytest.mark.parametrize("mode", ["parallel", "sequential", "rem"])
def test_every_mode_yields_an_evaluable_packed_model(ray_session, tiny_teacher, tiny_data, tmp_path, mode):
    teacher, data = tiny_teacher, tiny_data
    result = mrem(teacher, "sst2", "w2a8", data, small(mode=mode), EvaluateConfig(), tmp_path / "out")
    assert result.modules == (1 if mode == "rem" else 2)
    assert 0.0 <= result.eval.metrics["accuracy"] <= 1.0 and result.packed_bytes > 0
    # every module's output, fed by its quantized predecessors, is closer to the teacher than RTN's
    assert len(result.chain_errors) == result.modules
    assert all(m < r for m, r in zip(result.chain_errors, result.rtn_chain_errors)), result
    if mode == "parallel":  # module 0 fed module 1 directly, actor to actor
        assert result.modules_stats[0]["pushed_bytes"] > 0 and result.modules_stats[1]["pulled_bytes"] > 0


def test_parallel_mrem_spreads_over_two_nodes(ray_two_nodes, tiny_teacher, tiny_data, tmp_path):
    teacher, data = tiny_teacher, tiny_data
    result = mrem(teacher, "sst2", "w4a8", data, small(steps=10), EvaluateConfig(), tmp_path / "out")
    assert len({s["node_id"] for s in result.modules_stats}) == 2


def test_killed_actor_restarts_from_its_checkpoint(ray_session, tiny_teacher, tiny_data, tmp_path):
    teacher, data = tiny_teacher, tiny_data
    cfg = small(steps=60, checkpoint_every=10)
    specs = plan(teacher, cfg)
    name = trainer_name(tmp_path / "out" / "w4a8-parallel" / f"modules-{work_key(teacher, 'w4a8', cfg, specs)}", 1)
    killed = {}

    def kill_midway():
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                actor = ray_session.get_actor(name)
                step = ray_session.get(actor.progress.remote(), timeout=5)
            except Exception:
                time.sleep(0.2)
                continue
            if step >= 25:
                killed["step"] = step
                ray_session.kill(actor, no_restart=False)
                return
            time.sleep(0.1)

    thread = threading.Thread(target=kill_midway)
    thread.start()
    result = mrem(teacher, "sst2", "w4a8", data, cfg, EvaluateConfig(), tmp_path / "out")
    thread.join()
    assert killed, "the test never saw module 1 reach step 25"
    stats = result.modules_stats[1]
    assert stats["restarted"] and 20 <= stats["resumed_from_step"] <= killed["step"] and stats["steps"] == 60
    assert not result.modules_stats[0]["restarted"]  # only the failed module was redone
    assert result.restarts == 1


def test_driver_never_fetches_activation_shards(ray_session, tiny_teacher, tiny_data, tmp_path, monkeypatch):
    teacher, data = tiny_teacher, tiny_data
    import ray

    put_refs, got = [], []
    real_put, real_get = ray.put, ray.get
    monkeypatch.setattr(ray, "put", lambda v, *a, **k: put_refs.append(real_put(v, *a, **k)) or put_refs[-1])

    def spy_get(refs, *a, **k):
        got.extend(refs if isinstance(refs, list) else [refs])
        return real_get(refs, *a, **k)

    monkeypatch.setattr(ray, "get", spy_get)
    mrem(teacher, "sst2", "w4a8", data, small(steps=5), EvaluateConfig(), tmp_path / "out")
    assert put_refs, "calibration put no shards"
    assert not {r.hex() for r in put_refs} & {r.hex() for r in got if isinstance(r, ray.ObjectRef)}


def test_cache_dir_round_trips(ray_session, tiny_teacher, tiny_data, tmp_path):
    teacher, data = tiny_teacher, tiny_data
    import ray

    specs = split_layers(4, 2)
    first = calibrate(teacher, "sst2", data, specs, n=100, shard_size=64, cache_dir=str(tmp_path / "acts"))
    second = calibrate(teacher, "sst2", data, specs, n=100, shard_size=64, cache_dir=str(tmp_path / "acts"))
    assert not first.from_disk and second.from_disk and second.nbytes == first.nbytes > 0
    assert [len(b) for b in first.boundaries] == [2, 2] and second.num_samples == 100
    for b in range(2):
        for r1, r2 in zip(first.boundaries[b], second.boundaries[b]):
            a, c = ray.get(r1), ray.get(r2)
            assert set(a) == set(c) and all(np.array_equal(a[k], c[k]) for k in a)


def test_shards_hold_shard_size_rows_whatever_the_batch_size(ray_session, tiny_teacher, tiny_data):
    """Readers find row i in shard i // shard_size: a calibration batch larger than a shard must be split."""
    import ray

    cache = calibrate(tiny_teacher, "sst2", tiny_data, split_layers(4, 2), n=100, batch_size=64, shard_size=16)
    for refs in cache.boundaries:
        sizes = [len(next(iter(ray.get(r).values()))) for r in refs]
        assert sizes == [16] * 6 + [4]


def test_a_new_teacher_in_the_same_folder_is_trained_afresh(ray_session, tiny_teacher, tiny_data, tmp_path):
    """Module checkpoints of the old teacher stay on disk; a teacher re-fine-tuned into the same folder
    (another lr, say) must not resume them, or its quantized model would be the old teacher's."""
    from pipelines import models

    cfg = small(steps=10, checkpoint_every=5, mode="sequential")
    first = mrem(tiny_teacher, "sst2", "w4a8", tiny_data, cfg, EvaluateConfig(), tmp_path / "out")
    again = mrem(tiny_teacher, "sst2", "w4a8", tiny_data, cfg, EvaluateConfig(), tmp_path / "out")
    assert [s["resumed_from_step"] for s in first.modules_stats] == [0, 0]
    assert [s["resumed_from_step"] for s in again.modules_stats] == [10, 10]  # same teacher: resumed
    tok = models.load_tokenizer("tiny-bert")
    models.save_checkpoint(models.load_classifier("tiny-bert", 2, seed=4), tok, tiny_teacher, {"task": "sst2"})
    new = mrem(tiny_teacher, "sst2", "w4a8", tiny_data, cfg, EvaluateConfig(), tmp_path / "out")
    assert [s["resumed_from_step"] for s in new.modules_stats] == [0, 0]
