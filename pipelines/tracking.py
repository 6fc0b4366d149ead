"""MLflow: one parent run per `plmq` invocation, one nested run per stage.

Stages running in other processes (Ray Train workers, actors) log to their own
run by id through `MlflowClient`, so they only need the tracking URI and run id.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import yaml
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

DEFAULT_URI = "sqlite:///mlflow.db"
_PARENT: dict = {"run_id": None}  # set by attach() in a process that runs stages for a driver


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory, made absolute
    so that workers started elsewhere write to the same store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def _artifact_root(uri: str) -> str | None:
    """Keep artifacts beside a sqlite store instead of ./mlruns of whatever cwd we run in."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def setup(experiment: str) -> str:
    """Point MLflow at the store and experiment; returns the experiment id."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        root = _artifact_root(uri)
        # Marks the experiment as model training (not GenAI) for the MLflow UI.
        exp_id = mlflow.create_experiment(experiment, artifact_location=f"{root}/{experiment}" if root else None,
                                          tags={"mlflow.experimentKind": "custom_model_development"})
    else:
        exp_id = found.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def flatten(data: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)
    return out


@contextlib.contextmanager
def parent_run(experiment: str, run_name: str, config: dict, tags: dict | None = None) -> Iterator[str]:
    """The invocation's run: resolved config as params and as config.yaml."""
    setup(experiment)
    with mlflow.start_run(run_name=run_name, tags=tags) as run:
        mlflow.log_params(flatten(config))
        mlflow.log_text(yaml.safe_dump(config, sort_keys=False), "config.yaml")
        yield run.info.run_id


def attach(uri: str, experiment_id: str, parent_run_id: str) -> None:
    """In a Ray task running stages for a driver: nest this process's stage runs under its parent run."""
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=experiment_id)
    _PARENT["run_id"] = parent_run_id


@contextlib.contextmanager
def stage_run(stage: str, params: dict | None = None, tags: dict | None = None) -> Iterator[str]:
    """A nested run for one stage under the active parent run (or the attached driver's run)."""
    tags = {"plmq.stage": stage, **(tags or {})}
    if mlflow.active_run() is None and _PARENT["run_id"]:  # in a Ray task: name the source, not Ray's worker file
        start = mlflow.start_run(run_name=stage, parent_run_id=_PARENT["run_id"],
                                 tags={"mlflow.source.name": "plmq", **tags})
    else:
        start = mlflow.start_run(run_name=stage, nested=True, tags=tags)
    with start as run:
        if params:
            mlflow.log_params(flatten(params))
        yield run.info.run_id


def end_open_children(parent_run_id: str, status: str) -> list[str]:
    """End the runs under `parent_run_id` (at any depth) that are still RUNNING with `status` (FAILED, KILLED):
    the process that ran them died before it could end them. Returns their ids."""
    client = MlflowClient()
    experiment = client.get_run(parent_run_id).info.experiment_id
    ended, frontier = [], [parent_run_id]
    while frontier:
        below = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{frontier.pop()}'", max_results=5000)
        for run in below:
            frontier.append(run.info.run_id)
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, status)
                ended.append(run.info.run_id)
    return ended


def end_abandoned(experiment_id: str, output_dir: str) -> list[str]:
    """Runs of earlier invocations on `output_dir` still RUNNING, and everything under them, ended as KILLED:
    their driver was killed. Call it only while no other driver uses the folder (its lock is held)."""
    client = MlflowClient()
    query = f"tags.`plmq.output_dir` = '{output_dir}' and attributes.status = 'RUNNING'"
    ended = []
    for run in client.search_runs([experiment_id], query, max_results=5000):
        ended += end_open_children(run.info.run_id, "KILLED")
        client.set_terminated(run.info.run_id, "KILLED")
        ended.append(run.info.run_id)
    return ended


def log_stage(metrics: dict[str, float], info: dict) -> None:
    """What every stage's nested run holds: its metrics, its details as result.json, a `warning` tag
    when its evaluation flagged one (visible in the runs list, not only in the log)."""
    finite = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}
    if finite:
        mlflow.log_metrics(finite)
    mlflow.log_dict(info, "result.json")
    warning = (info.get("eval") or info).get("extra", {}).get("warning")
    if warning:
        mlflow.set_tag("warning", warning[:500])


def log_report(info: dict) -> None:
    """The comparison report in the active (parent) run: its files and the table as an MLflow table."""
    rows = info.get("comparison") or []
    if rows:
        columns = list(rows[0])
        mlflow.log_table({c: [r.get(c) for r in rows] for c in columns}, artifact_file="comparison.json")
    for path in info.get("files", []):
        mlflow.log_artifact(path)


class RunLogger:
    """Logs metrics to a known run from any process (Ray workers, actors). Picklable: its MLflow client
    is made in the process that logs. `buffer_steps` > 1 sends the metrics of that many steps as one batch
    (call `flush` at the end)."""

    def __init__(self, uri: str | None, run_id: str | None, buffer_steps: int = 1):
        self.uri, self.run_id, self.buffer_steps = uri, run_id, buffer_steps
        self._client: MlflowClient | None = None
        self._pending: list[Metric] = []
        self._steps = 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None, "_pending": [], "_steps": 0}

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.run_id:
            return
        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))]
        self._steps += 1
        if self._steps >= self.buffer_steps:
            self.flush()

    def flush(self) -> None:
        if not self.run_id or not self._pending:
            return
        if self._client is None:
            self._client = MlflowClient(self.uri)
        for i in range(0, len(self._pending), 900):  # MLflow caps a batch at 1000 metrics
            self._client.log_batch(self.run_id, metrics=self._pending[i:i + 900])
        self._pending, self._steps = [], 0
