"""The shape every stage has: a `Stage` (what to run), a `Context` (where and under which key)
and a `StageResult` (what it produced).

A stage module (`pipelines/stages/<kind>.py`) defines:

    KIND = "rtn"
    def plan(cfg, checkpoint=None) -> list[Stage]        # the stages of this kind a config asks for
    def fragment(cfg, stage) -> dict                     # the config that decides the stage's result
    def run(cfg, stage, upstream, ctx) -> StageResult    # run one stage from its explicit inputs

and optionally `TASK_CPUS` (CPUs its own Ray task holds), `FINAL = True` (runs last, in the driver) and
`needs(cfg, stage) -> {"CPU": n, "GPU": g}` (what the workers or actors it starts hold: the DAG starts it
only when they fit beside those of the other such stages running).

`upstream` maps each dependency's name to its recorded outcome (`StageResult` as a dict).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from quant import QuantConfig


@dataclass(frozen=True)
class Stage:
    name: str                                  # unique in a plan, e.g. "rtn/sst2/w4a8"
    kind: str                                  # a key of pipelines.stages.REGISTRY
    task: str | None = None
    quant: str | None = None
    method: str | None = None
    deps: tuple[str, ...] = ()                 # names of the stages whose outcomes this one reads
    checkpoint: str | None = None              # an input model given by the user (single-stage verbs)


@dataclass
class Context:
    root: Path                                 # the local run folder; outputs go below it
    key: str                                   # the stage key: state a stage resumes from is keyed by it
    force: bool = False                        # recompute: remove what an earlier attempt left first
    run_id: str | None = None                  # the stage's MLflow run (workers and actors log to it)
    tracking_uri: str | None = None


@dataclass
class StageResult:
    outputs: str | None = None                 # the stage's folder relative to Context.root
    checkpoint: str | None = None              # the model it wrote, for the stages after it
    row: dict | None = None                    # its line of the comparison report
    metrics: dict[str, float] = field(default_factory=dict)   # logged to the stage's MLflow run
    info: dict = field(default_factory=dict)   # JSON-able details, recorded with the stage
    resources: dict = field(default_factory=dict)  # {"cpus": n, "gpus": n} it held (report columns)


def input_checkpoint(stage: Stage, upstream: dict[str, dict], kind: str = "finetune") -> str:
    """The model a stage starts from: the one the user gave, else its `kind` dependency's."""
    if stage.checkpoint:
        return stage.checkpoint
    return upstream_of(upstream, kind)["checkpoint"]


def upstream_of(upstream: dict[str, dict], kind: str) -> dict:
    """The outcome of the dependency of `kind` (stage names start with their kind)."""
    for name, outcome in upstream.items():
        if name.split("/", 1)[0] == kind:
            return outcome
    raise KeyError(f"no upstream stage of kind {kind!r} among {sorted(upstream)}")


def export_folder(folder: Path, stage: Stage) -> Path:
    """Where a stage writes its model: `folder`, or for a stage on a user's checkpoint a sibling named after
    that checkpoint (`<folder>-ckpt-<hash of its path>`), so that quantizing two checkpoints into one output
    folder keeps both exports."""
    if not stage.checkpoint:
        return folder
    digest = hashlib.sha256(str(Path(stage.checkpoint).resolve()).encode()).hexdigest()[:8]
    return folder.with_name(f"{folder.name}-ckpt-{digest}")


def relative(path: str | Path, root: Path) -> str | None:
    """`path` relative to the run folder, or None when it lies outside (e.g. a shared prequant.dir)."""
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return None


def per_task_quant(kind: str, tasks: list[str], quants: list[str], checkpoint: str | None) -> list[Stage]:
    """One stage `<kind>/<task>/<QuantConfig>` per task and QuantConfig, after the task's fine-tune (or on
    the user's `checkpoint`, with no dependency)."""
    deps = (lambda task: ()) if checkpoint else (lambda task: (f"finetune/{task}",))
    return [Stage(f"{kind}/{task}/{QuantConfig.parse(q)}", kind, task, q, deps=deps(task), checkpoint=checkpoint)
            for task in tasks for q in quants]
