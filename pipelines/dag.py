"""The driver DAG: a plan's stages as Ray tasks linked by ObjectRefs.

Each stage is a Ray task that receives its upstream stages' recorded outcomes (small dicts:
checkpoint paths, metrics) and returns its own; Ray starts a stage as soon as its inputs exist,
so independent branches run at the same time. The heavy work inside a stage asks for its own
resources (Ray Train workers, module actors), so the stage task holds only what it computes
in-process. A stage whose key the store has recorded is skipped; final stages (the report) run
last, in the driver, on the outcomes of the stages that succeeded.

The DAG knows stages only through the registry (`pipelines.stages.REGISTRY`); it wraps every stage
in one nested MLflow run.
"""
from __future__ import annotations

import dataclasses
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from tqdm.auto import tqdm

from pipelines import faults, tracking
from pipelines.cluster import stage_runtime_env
from pipelines.stages import REGISTRY, Context, Stage
from pipelines.store import StageStore, stage_key


def keys(cfg: Any, stages: list[Stage]) -> dict[str, str]:
    """Each stage's key: its kind, its config fragment and its upstream stages' keys."""
    out: dict[str, str] = {}
    for st in stages:
        out[st.name] = stage_key(st.kind, REGISTRY[st.kind].fragment(cfg, st), [out[d] for d in st.deps])
    return out


def forced(stages: list[Stage], force: list[str]) -> set[str]:
    """Stages named (or of the kind named) in `force`, and everything downstream of them."""
    chosen = {s.name for s in stages if s.name in force or s.kind in force or s.name.startswith(tuple(
        f"{f}/" for f in force))}
    for st in stages:  # dependencies come first, so one pass reaches every descendant
        if any(d in chosen for d in st.deps):
            chosen.add(st.name)
    return chosen


def unknown_force(stages: list[Stage], force: list[str]) -> list[str]:
    """The `--force` values that name no stage (nor kind) of the plan."""
    kinds = {s.kind for s in stages}
    return [f for f in force if f not in kinds and not any(s.name == f or s.name.startswith(f + "/") for s in stages)]


def run_one(cfg: Any, stage: Stage, ctx: dict, key: str, upstream: dict[str, dict]) -> dict:
    """Run one stage in a nested MLflow run; returns its outcome (the StageResult as a dict)."""
    module = REGISTRY[stage.kind]
    root = Path(ctx["local_root"])
    fragment = module.fragment(cfg, stage)
    with tracking.stage_run(stage.name, {"key": key, **fragment}) as run_id:
        faults.point(f"stage.{stage.name}")
        start = time.time()
        context = Context(root, key, stage.name in ctx["forced"], run_id, ctx["tracking_uri"])
        result = module.run(cfg, stage, upstream, context)
        tracking.log_stage(result.metrics, result.info)
    return {**dataclasses.asdict(result), "stage_s": round(time.time() - start, 1)}


@ray.remote(max_retries=0)
def run_stage(stage: Stage, cfg: Any, ctx: dict, key: str, *upstream: dict) -> dict:
    """A stage where Ray placed it; recorded as complete in the store when it returns."""
    store = StageStore(ctx["run_dir"], ctx["local_root"])
    for up in upstream:  # a remote run directory: bring inputs made on other nodes here
        if up.get("outputs") and store.remote:
            store.fetch(up["outputs"])
    tracking.attach(ctx["tracking_uri"], ctx["experiment_id"], ctx["parent_run_id"])
    outcome = run_one(cfg, stage, ctx, key, {u["name"]: u for u in upstream})
    outcome["node"] = ray.get_runtime_context().get_node_id()
    return store.commit(stage.name, key, outcome, outcome.get("outputs"))


@dataclass
class DagResult:
    outcomes: dict[str, dict]
    skipped: list[str]
    failed: dict[str, str]


class Room:
    """What the stages that start workers of their own (Ray Train, module actors) hold: such a stage starts
    when its inputs are complete and its workers fit beside those of the other such stages running, so a
    stage waits in the DAG's queue (one line) instead of inside Ray Train or a placement group.
    `capacity` None: no limit (an autoscaler adds nodes on demand)."""

    def __init__(self, capacity: dict[str, float] | None):
        self.capacity, self.held = capacity, {}

    def fits(self, need: dict[str, float]) -> bool:
        if self.capacity is None or not self.held:  # alone it always starts: resolve_resources checked it fits
            return True
        used = {k: sum(h.get(k, 0) for h in self.held.values()) for k in need}
        return all(used[k] + v <= self.capacity.get(k, 0) + 1e-9 for k, v in need.items())

    def holders(self) -> str:
        return ", ".join(self.held)


def _need_text(need: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}{'s' if v != 1 else ''}" for k, v in need.items())


class _Scheduler:
    """Submits each stage when its inputs allow (see Room) and gathers outcomes as they come."""

    def __init__(self, cfg, ctx, stage_keys, room: Room):
        self.cfg, self.ctx, self.keys, self.room = cfg, ctx, stage_keys, room
        self.refs: dict[str, Any] = {}
        self.waiting: list[Stage] = []
        self.needs = {name: {} for name in stage_keys}  # set for each stage as it joins `waiting`
        self.outcomes: dict[str, dict] = {}
        self.failed: dict[str, str] = {}
        self.announced: set[str] = set()

    def submit(self, st: Stage) -> None:
        cpus = getattr(REGISTRY[st.kind], "TASK_CPUS", 0)  # what the stage computes in its own task
        self.refs[st.name] = run_stage.options(num_cpus=cpus, name=f"plmq {st.name}", **stage_runtime_env()).remote(
            st, self.cfg, self.ctx, self.keys[st.name], *[self.refs[d] for d in st.deps])

    def start_ready(self, write) -> None:
        """Submit every waiting stage that can start now; fail those whose inputs failed."""
        changed = True
        while changed:
            changed = False
            for st in list(self.waiting):
                if any(d in self.failed for d in st.deps):
                    self.failed[st.name] = f"not run: its input {next(d for d in st.deps if d in self.failed)} failed"
                elif not self._can_start(st, write):
                    continue
                else:
                    self.submit(st)
                self.waiting.remove(st)
                changed = True

    def wait(self, st: Stage) -> None:
        self.needs[st.name] = _needs(self.cfg, st)
        self.waiting.append(st)

    def _can_start(self, st: Stage, write) -> bool:
        need = self.needs[st.name]
        if not need:
            return all(d in self.refs for d in st.deps)
        if not all(d in self.outcomes for d in st.deps):
            return False
        if not self.room.fits(need):
            if st.name not in self.announced:
                write(f"[run] {st.name}: waiting for {_need_text(need)} held by {self.room.holders()}")
                self.announced.add(st.name)
            return False
        self.room.held[st.name] = need
        return True


def _needs(cfg, st: Stage) -> dict[str, float]:
    fn = getattr(REGISTRY[st.kind], "needs", None)
    return {k: v for k, v in fn(cfg, st).items() if v > 0} if fn else {}


def _gather(sched: _Scheduler, total: int) -> None:
    with tqdm(total=total, desc="stages", unit="stage") as bar:
        sched.start_ready(bar.write)
        while len(sched.outcomes) + len(sched.failed) < total:
            names = {ref: name for name, ref in sched.refs.items() if name not in sched.outcomes
                     and name not in sched.failed}
            if not names:  # cannot happen with a plan whose dependencies come first
                raise RuntimeError(f"stages wait for inputs that never start: {[s.name for s in sched.waiting]}")
            ready, _ = ray.wait(list(names), num_returns=1)
            name = names[ready[0]]
            try:
                sched.outcomes[name] = ray.get(ready[0])
                how = "complete earlier" if sched.outcomes[name].get("skipped") else "done"
                bar.write(f"[run] {name}: {how} ({sched.outcomes[name].get('stage_s', 0)} s)")
                faults.point(f"driver.{name}")
            except Exception as err:  # one failed branch must not hide the others' results
                sched.failed[name] = _short_error(err)
                bar.write(f"[run] {name}: FAILED:\n{sched.failed[name]}")
            sched.room.held.pop(name, None)
            sched.start_ready(bar.write)
            bar.n = len(sched.outcomes) + len(sched.failed)
            bar.refresh()


def _short_error(err: Exception) -> str:
    text = str(err) or "".join(traceback.format_exception_only(type(err), err))
    return text.strip()[-4000:]


def _run_final(stages, cfg, ctx, stage_keys, outcomes: dict, failed: dict) -> None:
    """Final stages, in the driver, on the outcomes that exist."""
    for st in stages:
        try:
            outcomes[st.name] = run_one(cfg, st, ctx, stage_keys[st.name],
                                        {d: outcomes[d] for d in st.deps if d in outcomes})
        except Exception as err:
            failed[st.name] = _short_error(err)
            print(f"[run] {st.name}: FAILED:\n{failed[st.name]}")


def execute(cfg: Any, stages: list[Stage], ctx: dict, force: list[str] | None = None) -> DagResult:
    """Submit every stage not already complete; wait for all; never stop at the first failure."""
    stage_keys = keys(cfg, stages)
    force_set = forced(stages, force or [])
    ctx = {**ctx, "forced": sorted(force_set)}
    store = StageStore(ctx["run_dir"], ctx["local_root"])
    final = [s for s in stages if getattr(REGISTRY[s.kind], "FINAL", False)]
    sched = _Scheduler(cfg, ctx, stage_keys, Room(_capacity(cfg)))
    skipped = []
    for st in [s for s in stages if s not in final]:
        done = None if st.name in force_set else store.done(st.name, stage_keys[st.name])
        if done is None:
            sched.wait(st)
            continue
        print(f"[run] {st.name}: complete (key {stage_keys[st.name]}); skipping")
        sched.refs[st.name], _ = ray.put({**done, "skipped": True}), skipped.append(st.name)
    _gather(sched, len(stages) - len(final))
    _run_final(final, cfg, ctx, stage_keys, sched.outcomes, sched.failed)
    return DagResult(sched.outcomes, skipped, sched.failed)


def _capacity(cfg: Any) -> dict[str, float] | None:
    """The cluster's CPUs and GPUs now; None on an autoscaling cluster (it adds nodes for what waits)."""
    if getattr(getattr(cfg, "cluster", None), "autoscaler_config", None):
        return None
    return {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}


def describe(cfg: Any, stages: list[Stage]) -> list[dict]:
    """The planned stages with their keys (for --dry-run and logs)."""
    stage_keys = keys(cfg, stages)
    return [{**dataclasses.asdict(s), "key": stage_keys[s.name]} for s in stages]
