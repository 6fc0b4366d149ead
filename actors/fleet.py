"""The K module trainers of one MREM stage as Ray actors: start them, train them, collect them.

The stage decides the resources (actor options, a placement group with one bundle per module),
the device and the loggers; this module only wires the actors together.
"""
from __future__ import annotations

from typing import Protocol

import ray
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.module_trainer import ModuleTrainer, TrainerSettings
from pipelines import faults
from pipelines.partition import Layout, PartSpec


class Shards(Protocol):
    """Calibration shards in the object store (pipelines.calibration.ActivationCache): boundaries[0]
    holds the ObjectRefs of the token inputs (ids, masks), boundaries[k] of the hidden states entering
    module k; row i lies in shard i // shard_size."""
    boundaries: list[list]
    layout: Layout
    num_samples: int
    shard_size: int


def trainer_name(key: str, k: int) -> str:
    """Named actors: `ray.get_actor(name)` finds a module's trainer (dashboards, fault tests)."""
    return f"mrem-{key}-{k}"


def launch(specs: list[PartSpec], checkpoint: str, quant: str, settings: TrainerSettings, shards: Shards,
           work_dir: str, key: str, mode: str, options: dict, placement_group: PlacementGroup, loggers: list,
           device: str) -> list:
    """One actor per module (bundle k of `placement_group`), created last-to-first so that in parallel
    mode each knows the successor it pushes to. `options`: Ray actor options (resources, restarts)."""
    remote = ray.remote(ModuleTrainer)
    trainers: list = [None] * len(specs)
    nxt = None
    for spec in reversed(specs):
        strategy = PlacementGroupSchedulingStrategy(placement_group, placement_group_bundle_index=spec.index)
        actor = remote.options(**options, **faults.runtime_env(), max_concurrency=4, name=trainer_name(key, spec.index),
                               scheduling_strategy=strategy).remote(
            spec, shards.layout, checkpoint, quant, settings, shards.boundaries[spec.index], shards.boundaries[0],
            shards.num_samples, shards.shard_size, work_dir, nxt if mode == "parallel" else None,
            loggers[spec.index], device, fed_by_predecessor=mode == "parallel" and not spec.first)
        trainers[spec.index] = actor
        nxt = actor
    return trainers


def train(trainers: list, mode: str) -> list[dict]:
    """Parallel (and rem): every actor at once. Sequential: in order, each fed its predecessor's outputs."""
    if mode != "sequential":
        return ray.get([t.train.remote() for t in trainers])
    stats = []
    for k, trainer in enumerate(trainers):
        stats.append(ray.get(trainer.train.remote()))
        if k + 1 < len(trainers):
            refs = ray.get(trainer.propagate.remote())  # a list of ObjectRefs: no activations here
            ray.get(trainers[k + 1].set_predecessor_outputs.remote(refs))
    return stats


def export(trainers: list) -> list[dict]:
    """Every module's trained state (full-model key names)."""
    return ray.get([t.export.remote() for t in trainers])


def stop(trainers: list) -> None:
    for t in trainers:
        ray.kill(t)
