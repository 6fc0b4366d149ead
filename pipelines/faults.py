"""Fault injection for tests: a process exits (`os._exit`) at a named point, exactly once.

`PLMQ_FAULTS` names the points as `site@step`, comma-separated; `PLMQ_FAULTS_DIR` is a folder where
each point that fired leaves a marker file, so a restarted process passes it the second time. A point
written `site@step:hold` does not exit: the process stops there for good (its other threads go on), so
a test can take its node away at a known step. The sites:

- `mrem.module<i>@N`: MREM module actor i, after its N-th training step;
- `finetune.rank<r>@N`: Ray Train worker of rank r (fine-tune), after its N-th optimizer step;
- `pretrain.rank<r>@N`: the same in a pre-training worker;
- `stage.<stage name>@0`: the process running the stage, once its MLflow run is open (e.g. `stage.rtn/sst2/w4a8@0`);
- `driver.<stage name>@0`: the driver (`plmq run`), once that stage is recorded as complete.

With `PLMQ_FAULTS` unset (always, outside tests) `point` returns at once. The driver hands both
variables to the Ray tasks and actors it starts (`runtime_env`), and Ray passes them on to the
actors and Train workers those start.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import quote, unquote

ENV, DIR_ENV = "PLMQ_FAULTS", "PLMQ_FAULTS_DIR"
EXIT_CODE = 43


ACTIONS = ("exit", "hold")


def armed() -> dict[str, str]:
    """The armed points: {"site@step": "exit" | "hold"}."""
    points = {}
    for p in (p.strip() for p in os.environ.get(ENV, "").split(",")):
        name, _, action = p.partition(":")
        if p and (action or "exit") not in ACTIONS:
            raise RuntimeError(f"{ENV}: {p!r} has the action {action!r}; use site@step or site@step:hold")
        if p:
            points[name] = action or "exit"
    return points


def point(site: str, step: int = 0) -> None:
    """Exit (or hold) this process here when `site@step` is armed and has not fired yet."""
    name = f"{site}@{step}"
    action = armed().get(name)
    if action is None:
        return
    folder = os.environ.get(DIR_ENV)
    if not folder:
        raise RuntimeError(f"{ENV}={os.environ[ENV]!r} needs {DIR_ENV}: a folder for the fired points' markers")
    try:
        fd = os.open(Path(folder) / quote(name, safe=""), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # fired before: this is the restarted process
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    print(f"[fault] {name}: {'holding' if action == 'hold' else 'exiting'} ({ENV})", flush=True)
    while action == "hold":
        time.sleep(3600)
    os._exit(EXIT_CODE)


def fired(folder: str | Path) -> list[str]:
    """The points that fired, from their markers in `folder`."""
    return sorted(unquote(p.name) for p in Path(folder).iterdir()) if Path(folder).is_dir() else []


def env_vars() -> dict[str, str]:
    """The variables that carry the armed points into a Ray task or actor: {} when none is armed."""
    return {ENV: os.environ[ENV], DIR_ENV: os.environ.get(DIR_ENV, "")} if armed() else {}


def runtime_env() -> dict:
    """Ray options that carry the armed points into a task or actor: {} when none is armed."""
    return {"runtime_env": {"env_vars": env_vars()}} if armed() else {}
