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


def _submit(stages, cfg, ctx, stage_keys, store, force_set) -> tuple[dict, list[str]]:
    refs, skipped = {}, []
    for st in stages:
        done = None if st.name in force_set else store.done(st.name, stage_keys[st.name])
        if done is not None:
            print(f"[run] {st.name}: complete (key {stage_keys[st.name]}); skipping")
            refs[st.name], _ = ray.put({**done, "skipped": True}), skipped.append(st.name)
            continue
        cpus = getattr(REGISTRY[st.kind], "TASK_CPUS", 0)  # what the stage computes in its own task
        refs[st.name] = run_stage.options(num_cpus=cpus, name=f"plmq {st.name}", **faults.runtime_env()).remote(
            st, cfg, ctx, stage_keys[st.name], *[refs[d] for d in st.deps])
    return refs, skipped


def _gather(refs: dict) -> tuple[dict, dict]:
    names = {ref: name for name, ref in refs.items()}
    pending, outcomes, failed = list(refs.values()), {}, {}
    with tqdm(total=len(pending), desc="stages", unit="stage") as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            name = names[ready[0]]
            try:
                outcomes[name] = ray.get(ready[0])
                how = "complete earlier" if outcomes[name].get("skipped") else "done"
                bar.write(f"[run] {name}: {how} ({outcomes[name].get('stage_s', 0)} s)")
                faults.point(f"driver.{name}")
            except Exception as err:  # one failed branch must not hide the others' results
                failed[name] = _short_error(err)
                bar.write(f"[run] {name}: FAILED:\n{failed[name]}")
            bar.update(1)
    return outcomes, failed


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
    refs, skipped = _submit([s for s in stages if s not in final], cfg, ctx, stage_keys, store, force_set)
    outcomes, failed = _gather(refs)
    _run_final(final, cfg, ctx, stage_keys, outcomes, failed)
    return DagResult(outcomes, skipped, failed)


def describe(cfg: Any, stages: list[Stage]) -> list[dict]:
    """The planned stages with their keys (for --dry-run and logs)."""
    stage_keys = keys(cfg, stages)
    return [{**dataclasses.asdict(s), "key": stage_keys[s.name]} for s in stages]
