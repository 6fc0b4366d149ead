"""Connecting to Ray and deciding CPU/GPU resources: the one place that does it."""
from __future__ import annotations

import os
from dataclasses import dataclass

import ray


def ensure_ray(num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (set by `ray job submit`), else start a local one."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        # The dashboard serves the state API that Ray Train's controller polls.
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, log_to_driver=True)


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


@dataclass(frozen=True)
class WorkerResources:
    """What one worker (Ray Train worker or module actor) asks for."""
    use_gpu: bool
    num_cpus: int
    num_gpus: float

    @property
    def torch_device(self) -> str:
        return "cuda" if self.use_gpu else "cpu"

    def as_options(self) -> dict:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}


def worker_resources(use_gpu: str = "auto", cpus_per_worker: int = 1) -> WorkerResources:
    """`use_gpu`: "auto" (GPU when the cluster has any), "true" or "false"."""
    if use_gpu not in ("auto", "true", "false"):
        raise ValueError(f"use_gpu={use_gpu!r}: use auto, true or false")
    gpu = cluster_gpus() > 0 if use_gpu == "auto" else use_gpu == "true"
    if gpu and use_gpu == "true" and cluster_gpus() == 0:
        raise ValueError("use_gpu=true but the Ray cluster has no GPUs; set use_gpu to auto or false")
    return WorkerResources(use_gpu=gpu, num_cpus=cpus_per_worker, num_gpus=1.0 if gpu else 0.0)


def available_workers(res: WorkerResources) -> int:
    """How many workers of `res` the cluster holds now (GPUs, or CPUs on a CPU cluster)."""
    total = ray.cluster_resources()
    if res.use_gpu:
        return max(1, int(total.get("GPU", 0) // res.num_gpus))
    return max(1, int(total.get("CPU", 1) // res.num_cpus))


def spread_placement(res: WorkerResources, count: int):
    """A placement group of `count` worker bundles spread over nodes (soft: packs when it must)."""
    from ray.util.placement_group import placement_group

    bundle = {"CPU": res.num_cpus, **({"GPU": res.num_gpus} if res.use_gpu else {})}
    return placement_group([dict(bundle) for _ in range(count)], strategy="SPREAD")


def actor_device() -> str:
    """Inside an actor: its GPU if Ray gave it one and CUDA is real, else the CPU.

    Ray's GPU resources are logical (fake GPUs in tests), so both must hold.
    """
    import torch

    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
