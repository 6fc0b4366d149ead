"""Connecting to Ray and deciding CPU/GPU resources: the one place that does it."""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import ray
import yaml
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.state import list_tasks

from pipelines import faults
from pipelines.config import MremConfig, RunConfig
from pipelines.errors import ConfigError
from pipelines.models import num_layers


def ensure_ray(num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (set by `ray job submit`), else start a local one."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        # The dashboard serves the state API that Ray Train's controller polls.
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, log_to_driver=True)


def stage_runtime_env() -> dict:
    """Ray options for a stage's task: the work it starts (Ray Train's controller and workers, actors) inherits
    the driver's cluster address, so Ray's state API finds this cluster even when another Ray instance runs on
    the machine; and any armed fault points (tests)."""
    return {"runtime_env": {"env_vars": {"RAY_ADDRESS": ray.get_runtime_context().gcs_address,
                                         **faults.env_vars()}}}


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

    @property
    def bundle(self) -> dict:
        """One worker's placement-group bundle (and the request resolve_resources checks against nodes)."""
        return {"CPU": self.num_cpus, **({"GPU": self.num_gpus} if self.use_gpu else {})}


def worker_resources(use_gpu: str = "auto", cpus_per_worker: int = 1, gpus_per_worker: float = 1.0) -> WorkerResources:
    """`use_gpu`: "auto" (GPU when the cluster has any now), "true" or "false". "true" on a cluster
    with no GPU node yet is allowed: an autoscaler may add them (resolve_resources checks the
    node types, and placement waits with a timeout). `gpus_per_worker`: what a worker on a GPU asks
    for; a share below 1 lets workers share a GPU (0.5: two per GPU)."""
    if use_gpu not in ("auto", "true", "false"):
        raise ValueError(f"use_gpu={use_gpu!r}: use auto, true or false")
    gpu = cluster_gpus() > 0 if use_gpu == "auto" else use_gpu == "true"
    return WorkerResources(use_gpu=gpu, num_cpus=cpus_per_worker, num_gpus=float(gpus_per_worker) if gpu else 0.0)


def actor_resources(mrem: MremConfig) -> WorkerResources:
    """What one MREM module actor asks for: mrem.cpus_per_actor CPUs and, on GPUs, mrem.gpus_per_actor."""
    return worker_resources(mrem.use_gpu, mrem.cpus_per_actor, mrem.gpus_per_actor)


def spread_placement(res: WorkerResources, count: int, timeout_s: float | None = None) -> PlacementGroup:
    """A placement group of `count` worker bundles spread over nodes (soft: packs when it must),
    ready when it returns. On an autoscaling cluster the request is what makes nodes launch."""
    bundle = res.bundle
    pg = placement_group([dict(bundle) for _ in range(count)], strategy="SPREAD")
    try:
        _wait_ready(pg, f"[placement] {count} worker(s) of {bundle}", timeout_s)
    except GetTimeoutError:
        remove_placement_group(pg)
        raise TimeoutError(f"waited {timeout_s:.0f} s for {count} workers of {bundle} and the cluster could not "
                           "place them: lower the request (use_gpu, cpus per worker, modules) or add nodes") from None
    return pg


def workers_need(res: WorkerResources, count: int) -> dict[str, float]:
    """What `count` workers of `res` hold together, in Ray's resource names ({"CPU": 4, "GPU": 2})."""
    return {k: v * count for k, v in res.bundle.items()}


WAIT_NOTE_S = 5.0  # a wait longer than this is announced


def _wait_ready(pg: PlacementGroup, what: str, timeout_s: float | None) -> float:
    """Wait for `pg` (raises GetTimeoutError after `timeout_s`); says once what it waits for and for whom."""
    start = time.time()
    try:
        ray.get(pg.ready(), timeout=min(WAIT_NOTE_S, timeout_s or WAIT_NOTE_S))
        return time.time() - start
    except GetTimeoutError:
        if timeout_s is not None and timeout_s <= WAIT_NOTE_S:
            raise
    print(f"{what}: waiting for resources held by {running_stages() or 'other work'}", flush=True)
    ray.get(pg.ready(), timeout=None if timeout_s is None else max(timeout_s - (time.time() - start), 0.01))
    waited = time.time() - start
    print(f"{what}: placed after {waited:.0f} s", flush=True)
    return waited


def running_stages() -> str:
    """The plmq stages running on the cluster now (their Ray task names), for a waiting message."""
    try:
        tasks = list_tasks(filters=[("state", "=", "RUNNING")], limit=1000, raise_on_missing_output=False)
    except Exception:  # the state API needs the dashboard; the message is only a courtesy
        return ""
    return ", ".join(sorted({t.name.removeprefix("plmq ") for t in tasks if t.name.startswith("plmq ")}))


def node_capacities(autoscaler_config: str | None = None) -> list[dict]:
    """Resources of each live node, plus one entry per autoscaler node type (with its max_workers)."""
    caps = [{**n["Resources"], "max_workers": 1} for n in ray.nodes() if n.get("Alive")]
    if autoscaler_config:
        with open(autoscaler_config) as f:
            types = (yaml.safe_load(f) or {}).get("available_node_types", {})
        caps += [{**(t.get("resources") or {}), "max_workers": t.get("max_workers", 0)} for t in types.values()]
    return caps


RESOURCE_UNIT = 10_000  # Ray counts resources in units of 1/10,000 (fractional GPUs such as 0.5)


def _fits(request: dict, cap: dict) -> int:
    """How many `request`s one node of capacity `cap` holds (in Ray's units, so 1 GPU holds ten 0.1s)."""
    counts = [round(cap.get(k, 0) * RESOURCE_UNIT) // round(v * RESOURCE_UNIT) for k, v in request.items() if v > 0]
    return min(counts) if counts else 0


def _resolve_gpu(section: str, use_gpu: str, has_gpu: bool) -> str:
    if use_gpu == "true" and not has_gpu:
        raise ConfigError(f"{section}.use_gpu=true but no node or autoscaler node type has a GPU; set it to "
                          "auto or false, or name the cluster's config in cluster.autoscaler_config")
    return ("true" if has_gpu else "false") if use_gpu == "auto" else use_gpu


def _check_fits(section: str, request: dict, caps: list[dict]) -> int:
    """Workers of `request` the cluster can hold at most; raises when no node type holds one."""
    total = sum(_fits(request, c) * max(c["max_workers"], 0) for c in caps)
    if total == 0:
        biggest = {k: max(c.get(k, 0) for c in caps) for k in request}
        raise ConfigError(f"{section}: one worker asks for {request}, but the largest node (or autoscaler node type) "
                          f"has {biggest}; lower the request or add a bigger node type")
    return total


def mrem_modules(mrem: MremConfig, room: int, layers: int) -> int:
    """MREM's module count K: 1 for rem (the whole model), else `mrem.modules` when set, else as many
    modules as the cluster holds actors at once (`room`), at most one per layer."""
    if mrem.mode == "rem":
        return 1
    if mrem.modules is not None and mrem.modules > layers:
        raise ConfigError(f"mrem.modules={mrem.modules}: the model has {layers} layers, so at most {layers} modules "
                          "(or null: as many as the cluster holds actors at once)")
    return mrem.modules if mrem.modules is not None else min(room, layers)


def resolve_resources(cfg: RunConfig, model: str | None = None) -> RunConfig:
    """Decide GPU use (`auto`) and the MREM module count K once, in the driver, and check that every
    worker the run will ask for fits some node: a bad request fails before any work starts.
    `model`: the model MREM splits when it is not `cfg.model` (a user checkpoint)."""
    caps = node_capacities(cfg.cluster.autoscaler_config)
    has_gpu = any(c.get("GPU", 0) >= 1 for c in caps)
    ft = dataclasses.replace(cfg.finetune, use_gpu=_resolve_gpu("finetune", cfg.finetune.use_gpu, has_gpu))
    mrem = dataclasses.replace(cfg.mrem, use_gpu=_resolve_gpu("mrem", cfg.mrem.use_gpu, has_gpu))
    worker = worker_resources(ft.use_gpu, ft.cpus_per_worker).bundle
    room = _check_fits("finetune (cpus_per_worker, use_gpu)", worker, caps)
    if room < ft.num_workers and not cfg.cluster.autoscaler_config:
        raise_short("finetune.num_workers", ft.num_workers, worker)
    if mrem.quant:
        actor = actor_resources(mrem).bundle  # K actors of gpus_per_actor share a node's G GPUs: K * share <= G
        room = _check_fits("mrem (cpus_per_actor, use_gpu, gpus_per_actor)", actor, caps)
        mrem = dataclasses.replace(mrem, modules=mrem_modules(mrem, room, num_layers(model or cfg.model)))
        if mrem.modules > room and not cfg.cluster.autoscaler_config:  # every module's actor runs at once
            hint = ", or share GPUs (mrem.gpus_per_actor=0.5)" if "GPU" in actor else ""
            raise_short("mrem.modules", mrem.modules, actor, hint)
        e2e = mrem.e2e.workers or mrem.modules
        if mrem.e2e.enabled and e2e > room and not cfg.cluster.autoscaler_config:
            raise_short("mrem.e2e.workers", e2e, actor)
    return dataclasses.replace(cfg, finetune=ft, mrem=mrem)


def raise_short(key: str, wanted: int, request: dict, hint: str = "") -> None:
    raise ConfigError(f"{key}={wanted}: the cluster cannot hold {wanted} workers of {request} at once; "
                      f"lower it or add nodes{hint}")
