"""`plmq`: one verb per stage plus `run` for the whole pipeline.

Every verb takes an optional YAML config and `--set section.key=value`
overrides; common flags (--task, --model, --output-dir) are shortcuts for them.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from pipelines.config import ConfigError, RunConfig, load_config

app = typer.Typer(help="plmq: quantize pre-trained language models on Ray.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)

ConfigArg = typer.Argument(None, help="YAML config file (see configs/)")
SetOpt = typer.Option([], "--set", help="Override a config value: section.key=value (repeatable)")


def _load(config: Optional[Path], overrides: list[str], task: Optional[str] = None,
          model: Optional[str] = None, output_dir: Optional[str] = None) -> RunConfig:
    extra = list(overrides)
    if task:
        extra.append(f"tasks=[{task}]")
    if model:
        extra.append(f"model={model}")
    if output_dir:
        extra.append(f"output_dir={output_dir}")
    try:
        return load_config(config, extra)
    except ConfigError as err:
        typer.echo(f"config error: {err}", err=True)
        raise typer.Exit(2) from None


def _ui_hint() -> str:
    from pipelines.tracking import tracking_uri
    return f"Browse the runs:  mlflow ui --backend-store-uri {tracking_uri()}  (then open http://127.0.0.1:5000)"


@app.command()
def run(config: Optional[Path] = ConfigArg, overrides: list[str] = SetOpt,
        task: Optional[str] = typer.Option(None, help="GLUE task (overrides tasks)"),
        model: Optional[str] = typer.Option(None, help="model name or path"),
        output_dir: Optional[str] = typer.Option(None, help="where stage outputs go")) -> None:
    """Run the pipeline of a config: fine-tune, evaluate, report."""
    from pipelines.run import run as run_pipeline

    cfg = _load(config, overrides, task, model, output_dir)
    summary = run_pipeline(cfg)
    typer.echo("\n" + summary.table + "\n")
    typer.echo(f"Results: {summary.output_dir}/results.md   wall time {summary.wall_s:.0f} s")
    typer.echo(_ui_hint())


@app.command()
def finetune(config: Optional[Path] = ConfigArg, overrides: list[str] = SetOpt,
             task: Optional[str] = typer.Option(None), model: Optional[str] = typer.Option(None),
             output_dir: Optional[str] = typer.Option(None)) -> None:
    """Full-precision fine-tuning of the model on each task (Ray Train)."""
    from pipelines import tracking
    from pipelines.run import run_finetune_stage

    cfg = _load(config, overrides, task, model, output_dir)
    with tracking.parent_run(cfg.experiment_name, "finetune", dataclasses.asdict(cfg)):
        for t in cfg.tasks:
            result = run_finetune_stage(cfg, t, Path(cfg.output_dir).resolve())
            typer.echo(json.dumps(dataclasses.asdict(result), indent=2))


@app.command()
def evaluate(checkpoint: Path = typer.Argument(..., help="checkpoint folder from finetune"),
             config: Optional[Path] = typer.Option(None, "--config", help="YAML config"),
             overrides: list[str] = SetOpt, task: Optional[str] = typer.Option(None)) -> None:
    """GLUE dev metrics of a checkpoint."""
    from pipelines import tracking
    from pipelines.run import run_evaluate_stage

    cfg = _load(config, overrides, task)
    if not checkpoint.is_dir():
        typer.echo(f"checkpoint {checkpoint} is not a folder; pass the model folder written by finetune", err=True)
        raise typer.Exit(2)
    with tracking.parent_run(cfg.experiment_name, "evaluate", dataclasses.asdict(cfg)):
        for t in cfg.tasks:
            result, _ = run_evaluate_stage(cfg, t, str(checkpoint), "checkpoint")
            typer.echo(json.dumps(dataclasses.asdict(result), indent=2))


def main() -> None:
    try:
        app()
    except (ConfigError, FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
