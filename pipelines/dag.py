"""The driver DAG of `plmq run`: stages as Ray tasks linked by ObjectRefs.

    finetune -> evaluate(fp)                         per task
             -> rtn (one per QuantConfig)            per task
             -> calibrate -> mrem (one per config)   per task
    prequant-quantize -> prequant-finetune           once per config / per task
    all of them -> report

Each stage is a Ray task that receives its upstream stages' outcomes (small
dicts: checkpoint paths, metrics) and returns its own; Ray starts a stage as
soon as its inputs exist, so independent branches run at the same time. The
heavy work inside a stage asks for its own resources (Ray Train workers, module
actors), so the stage task itself holds only what it computes in-process.
"""
from __future__ import annotations

import dataclasses
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import ray

from pipelines.config import RunConfig, from_dict, to_dict
from pipelines.store import StageStore, stage_key

KINDS = ("finetune", "evaluate", "rtn", "calibrate", "mrem", "prequant-quantize", "prequant-finetune")
IN_PROCESS = {"evaluate", "rtn", "calibrate", "prequant-quantize"}  # compute inside the stage task


@dataclass(frozen=True)
class Stage:
    name: str                      # unique, e.g. "rtn/sst2/w4a8"
    kind: str                      # one of KINDS
    task: str | None = None
    quant: str | None = None
    method: str | None = None
    deps: tuple[str, ...] = ()


def _canonical(quant: str) -> str:
    from quant import QuantConfig

    return str(QuantConfig.parse(quant))


def _prequant_stages(cfg: RunConfig) -> list[Stage]:
    from pipelines.prequant import PEFT_METHODS, artefact_spec, method_label

    stages: dict[str, Stage] = {}
    for quant in cfg.prequant.quant:
        for method in (m for m in cfg.prequant.methods if m in PEFT_METHODS):
            spec = artefact_spec(cfg.model, quant, cfg.prequant, method)
            base = f"prequant-quantize/{spec.quant}/{spec.criterion or 'plain'}"
            stages.setdefault(base, Stage(base, "prequant-quantize", quant=quant, method=method))
            for task in cfg.tasks:
                name = f"prequant/{task}/{method_label(method, cfg.prequant)}-{_canonical(quant)}"
                stages[name] = Stage(name, "prequant-finetune", task, quant, method, (base,))
    return list(stages.values())


def build(cfg: RunConfig) -> list[Stage]:
    """Every stage of the config, in an order where dependencies come first."""
    stages = []
    for task in cfg.tasks:
        ft = f"finetune/{task}"
        stages += [Stage(ft, "finetune", task), Stage(f"evaluate/{task}/fp", "evaluate", task, deps=(ft,))]
        stages += [Stage(f"rtn/{task}/{_canonical(q)}", "rtn", task, q, deps=(ft,)) for q in cfg.rtn.quant]
        if cfg.mrem.quant:
            cal = f"calibrate/{task}"
            stages.append(Stage(cal, "calibrate", task, deps=(ft,)))
            stages += [Stage(f"mrem/{task}/{_canonical(q)}-{cfg.mrem.mode}", "mrem", task, q, deps=(ft, cal))
                       for q in cfg.mrem.quant]
    return stages + _prequant_stages(cfg)


def fragment(cfg: RunConfig, stage: Stage) -> dict:
    """The part of the config that decides `stage`'s result (hashed into its key)."""
    quiet = {"log_every", "placement_timeout_s", "max_restarts"}  # do not change results
    section = lambda s: {k: v for k, v in to_dict(s).items() if k not in quiet}  # noqa: E731
    base = {"task": stage.task, "quant": stage.quant, "method": stage.method}
    data, ev = to_dict(cfg.data), to_dict(cfg.evaluate)
    if stage.kind == "finetune":
        return {**base, "model": cfg.model, "data": data, "finetune": section(cfg.finetune)}
    if stage.kind == "evaluate":
        return {**base, "data": data, "evaluate": ev}
    if stage.kind == "rtn":
        return {**base, "data": data, "evaluate": ev, "rtn": {**section(cfg.rtn), "quant": None}}
    mrem = {**section(cfg.mrem), "quant": None}
    if stage.kind == "calibrate":
        keep = ("mode", "modules", "calib_samples", "calib_batch_size", "shard_size", "seed")
        return {**base, "data": data, "mrem": {k: mrem[k] for k in keep}}
    if stage.kind == "mrem":
        return {**base, "data": data, "evaluate": ev, "mrem": mrem}
    pq = {**to_dict(cfg.prequant), "quant": None, "methods": None}
    if stage.kind == "prequant-quantize":
        return {**base, "model": cfg.model, "prequant": pq}
    return {**base, "data": data, "evaluate": ev, "finetune": section(cfg.finetune), "prequant": pq}


def keys(cfg: RunConfig, stages: list[Stage]) -> dict[str, str]:
    out: dict[str, str] = {}
    for st in stages:
        out[st.name] = stage_key(st.kind, fragment(cfg, st), [out[d] for d in st.deps])
    return out


def forced(stages: list[Stage], force: list[str]) -> set[str]:
    """Stages named (or of the kind named) in `force`, and everything downstream of them."""
    chosen = {s.name for s in stages if s.name in force or s.kind in force or s.name.startswith(tuple(
        f"{f}/" for f in force))}
    for st in stages:  # dependencies come first, so one pass reaches every descendant
        if any(d in chosen for d in st.deps):
            chosen.add(st.name)
    return chosen


def stage_resources(cfg: RunConfig, stage: Stage) -> dict:
    """What the stage task itself holds; its workers/actors ask for theirs."""
    return {"num_cpus": 1 if stage.kind in IN_PROCESS else 0}


@ray.remote(max_retries=0)
def run_stage(stage: Stage, cfg_dict: dict, ctx: dict, key: str, *upstream: dict) -> dict:
    """Run one stage where Ray placed it; record it as complete in the store."""
    from pipelines import executors
    from pipelines import tracking

    cfg = from_dict(RunConfig, cfg_dict)
    store = StageStore(ctx["run_dir"], ctx["local_root"])
    for up in upstream:  # a remote run directory: bring inputs made on other nodes here
        if up.get("outputs") and store.remote:
            store.fetch(up["outputs"])
    tracking.attach(ctx["tracking_uri"], ctx["experiment_id"], ctx["parent_run_id"])
    start = time.time()
    outcome, outputs = executors.EXECUTORS[stage.kind](cfg, stage, {u["name"]: u for u in upstream},
                                                       Path(ctx["local_root"]), stage.name in ctx["forced"])
    outcome["stage_s"] = round(time.time() - start, 1)
    outcome["node"] = ray.get_runtime_context().get_node_id()
    return store.commit(stage.name, key, outcome, outputs)


@dataclass
class DagResult:
    outcomes: dict[str, dict]
    skipped: list[str]
    failed: dict[str, str]


def _submit(stages, cfg, ctx, stage_keys, store, force_set) -> tuple[dict, list[str]]:
    refs, skipped = {}, []
    cfg_dict = to_dict(cfg)
    for st in stages:
        done = None if st.name in force_set else store.done(st.name, stage_keys[st.name])
        if done is not None:
            print(f"[run] {st.name}: complete (key {stage_keys[st.name]}); skipping")
            refs[st.name], _ = ray.put({**done, "skipped": True}), skipped.append(st.name)
            continue
        refs[st.name] = run_stage.options(**stage_resources(cfg, st), name=f"plmq {st.name}").remote(
            st, cfg_dict, ctx, stage_keys[st.name], *[refs[d] for d in st.deps])
    return refs, skipped


def _gather(refs: dict) -> tuple[dict, dict]:
    from tqdm.auto import tqdm

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
            except Exception as err:  # one failed branch must not hide the others' results
                failed[name] = _short_error(err)
                bar.write(f"[run] {name}: FAILED:\n{failed[name]}")
            bar.update(1)
    return outcomes, failed


def _short_error(err: Exception) -> str:
    text = str(err) or "".join(traceback.format_exception_only(type(err), err))
    return text.strip()[-4000:]


def execute(cfg: RunConfig, ctx: dict, force: list[str] | None = None) -> DagResult:
    """Submit every stage not already complete; wait for all; never stop at the first failure."""
    stages = build(cfg)
    stage_keys = keys(cfg, stages)
    force_set = forced(stages, force or [])
    ctx = {**ctx, "forced": sorted(force_set)}
    store = StageStore(ctx["run_dir"], ctx["local_root"])
    refs, skipped = _submit(stages, cfg, ctx, stage_keys, store, force_set)
    outcomes, failed = _gather(refs)
    return DagResult(outcomes, skipped, failed)


def describe(cfg: RunConfig) -> list[dict]:
    """The planned stages (for --dry-run and logs)."""
    stages = build(cfg)
    stage_keys = keys(cfg, stages)
    return [{**dataclasses.asdict(s), "key": stage_keys[s.name]} for s in stages]
