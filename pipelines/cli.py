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
        output_dir: Optional[str] = typer.Option(None, help="run directory: local path or pyarrow.fs URI"),
        force: list[str] = typer.Option([], "--force", help="recompute a stage (kind such as mrem, or a full "
                                        "name such as rtn/sst2/w4a8) and what depends on it; repeatable"),
        dry_run: bool = typer.Option(False, "--dry-run", help="print the planned stages and exit")) -> None:
    """Run the whole DAG of a config: finetune, evaluate, rtn, calibrate, mrem, prequant, report.

    Stages already complete in the run directory (same inputs) are skipped."""
    from pipelines.dag import KINDS, describe
    from pipelines.run import StageFailure
    from pipelines.run import run as run_pipeline

    cfg = _load(config, overrides, task, model, output_dir)
    planned = describe(cfg)
    unknown = [f for f in force if f not in KINDS and not any(p["name"] == f or p["name"].startswith(f + "/")
                                                              for p in planned)]
    if unknown:
        typer.echo(f"config error: --force {unknown[0]!r} names no stage; stages of this config: "
                   + ", ".join(p["name"] for p in planned), err=True)
        raise typer.Exit(2)
    if dry_run:
        for p in planned:
            typer.echo(f"{p['name']:50s} key {p['key']}  after {', '.join(p['deps']) or '-'}")
        return
    from pipelines.data import DataError

    try:
        summary = run_pipeline(cfg, force=force)
    except (ConfigError, DataError) as err:
        typer.echo(f"config error: {err}", err=True)
        raise typer.Exit(2) from None
    except StageFailure as err:
        typer.echo(str(err), err=True)
        typer.echo(_ui_hint(), err=True)
        raise typer.Exit(1) from None
    typer.echo("\n" + summary.table + "\n")
    typer.echo(f"Report: {summary.output_dir}/report.md (+ report.csv, accuracy_vs_bits.png)   "
               f"wall time {summary.wall_s:.0f} s, {len(summary.skipped)} stage(s) already complete")
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


@app.command()
def rtn(checkpoint: Path = typer.Argument(..., help="fine-tuned checkpoint folder"),
        quant: list[str] = typer.Option(..., "--quant", help="QuantConfig string, e.g. w4a8 (repeatable)"),
        config: Optional[Path] = typer.Option(None, "--config", help="YAML config"),
        overrides: list[str] = SetOpt, task: Optional[str] = typer.Option(None),
        output_dir: Optional[str] = typer.Option(None)) -> None:
    """Round-to-nearest post-training quantization of a checkpoint, exported packed and evaluated."""
    from pipelines import tracking
    from pipelines.run import run_rtn_stage

    cfg = _load(config, overrides + [f"rtn.quant=[{','.join(quant)}]"], task, None, output_dir)
    with tracking.parent_run(cfg.experiment_name, "rtn", dataclasses.asdict(cfg)):
        for t in cfg.tasks:
            for q in cfg.rtn.quant:
                result = run_rtn_stage(cfg, t, str(checkpoint), q, Path(cfg.output_dir).resolve())
                typer.echo(f"{t} {result.quant_config}: {result.eval.main_metric}={result.eval.main:.4f} "
                           f"packed {result.packed_bytes / 2**20:.2f} MB (FP {result.fp_bytes / 2**20:.2f} MB) "
                           f"-> {result.checkpoint}")


@app.command()
def mrem(checkpoint: Path = typer.Argument(..., help="fine-tuned checkpoint folder (the teacher)"),
         quant: list[str] = typer.Option(..., "--quant", help="QuantConfig string, e.g. w4a8 (repeatable)"),
         mode: Optional[str] = typer.Option(None, help="parallel | sequential | rem"),
         cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="Arrow cache of teacher activations"),
         config: Optional[Path] = typer.Option(None, "--config", help="YAML config"),
         overrides: list[str] = SetOpt, task: Optional[str] = typer.Option(None),
         output_dir: Optional[str] = typer.Option(None)) -> None:
    """Module-wise reconstruction (MREM) on Ray actors: calibrate, train modules, export, evaluate."""
    from pipelines import tracking
    from pipelines.run import run_mrem_stage

    extra = [f"mrem.quant=[{','.join(quant)}]"] + ([f"mrem.mode={mode}"] if mode else [])
    extra += [f"mrem.cache_dir={cache_dir}"] if cache_dir else []
    cfg = _load(config, overrides + extra, task, None, output_dir)
    with tracking.parent_run(cfg.experiment_name, "mrem", dataclasses.asdict(cfg)):
        for t in cfg.tasks:
            for q in cfg.mrem.quant:
                r = run_mrem_stage(cfg, t, str(checkpoint), q, Path(cfg.output_dir).resolve())
                typer.echo(f"{t} {r.quant_config} {r.mode} x{r.modules}: {r.eval.main_metric}={r.eval.main:.4f} "
                           f"module errors {[round(e, 5) for e in r.chain_errors]} "
                           f"(RTN {[round(e, 5) for e in r.rtn_chain_errors]}), restarts {r.restarts} "
                           f"-> {r.checkpoint}")


# ---- pretrain (issue #6): quantized pre-training; config dataclasses in pipelines/pretrain.py
def _load_pretrain(config: Optional[Path], overrides: list[str], extra: list[str]):
    from pipelines.pretrain import PretrainRunConfig

    try:
        return load_config(config, list(overrides) + extra, cls=PretrainRunConfig)
    except ConfigError as err:
        typer.echo(f"config error: {err}", err=True)
        raise typer.Exit(2) from None


@app.command()
def pretrain(config: Optional[Path] = ConfigArg, overrides: list[str] = SetOpt,
             recipe: Optional[str] = typer.Option(None, help="quantization recipe, e.g. fp, w8a8g8, w4, m8v8"),
             corpus: Optional[str] = typer.Option(None, help="tinyshakespeare, wikitext2 or a text file"),
             output_dir: Optional[str] = typer.Option(None),
             sweep: bool = typer.Option(False, "--sweep", help="run the config's sweep.recipes grid instead")) -> None:
    """Pre-train a GPT-2 from scratch with quantized weights/activations/gradients/optimizer states."""
    from pipelines.pretrain import run_pretrain_stage
    from pipelines.pretrain_sweep import run_sweep_stage

    extra = [f"quant.recipe={recipe}"] if recipe else []
    extra += [f"data.corpus={corpus}"] if corpus else []
    extra += [f"output_dir={output_dir}"] if output_dir else []
    cfg = _load_pretrain(config, overrides, extra)
    if sweep:
        summary = run_sweep_stage(cfg)
        typer.echo("\n" + summary["table"] + "\n")
        typer.echo(f"Results: {summary['output_dir']}/sweep_results.md, loss_curves.png")
    else:
        result = run_pretrain_stage(cfg)
        typer.echo(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))
    typer.echo(_ui_hint())


@app.command("pretrain-sweep")
def pretrain_sweep(config: Optional[Path] = ConfigArg, overrides: list[str] = SetOpt) -> None:
    """Run a grid of quantization recipes (sweep.recipes x sweep.corpora) as parallel Ray tasks."""
    pretrain(config, overrides, None, None, None, True)
# ---- end pretrain


# ---- prequant (issue #5): pipelines/prequant.py
PrequantQuantOpt = typer.Option([], "--quant", help="QuantConfig with quantized weights, e.g. w4 (repeatable)")
PrequantMethodOpt = typer.Option([], "--method", help="fp | rtn | prequant | random | lora | bitfit (repeatable)")


def _prequant_cfg(config: Optional[Path], overrides: list[str], quant: list[str], method: list[str],
                  task: Optional[str] = None, model: Optional[str] = None,
                  output_dir: Optional[str] = None) -> RunConfig:
    extra = [f"prequant.quant=[{','.join(quant)}]"] if quant else []
    extra += [f"prequant.methods=[{','.join(method)}]"] if method else []
    cfg = _load(config, list(overrides) + extra, task, model, output_dir)
    if not cfg.prequant.quant:
        typer.echo("config error: no QuantConfig: pass --quant w4 or set prequant.quant", err=True)
        raise typer.Exit(2)
    return cfg


@app.command("prequant-quantize")
def prequant_quantize(config: Optional[Path] = ConfigArg, overrides: list[str] = SetOpt,
                      quant: list[str] = PrequantQuantOpt, method: list[str] = PrequantMethodOpt,
                      model: Optional[str] = typer.Option(None),
                      output_dir: Optional[str] = typer.Option(None)) -> None:
    """PreQuant, task-agnostic: quantize the pre-trained model once (low-bit + FP outlier columns)."""
    from pipelines import tracking
    from pipelines.prequant import PEFT_METHODS, run_prequant_quantize_stage

    cfg = _prequant_cfg(config, overrides, quant, method, None, model, output_dir)
    with tracking.parent_run(cfg.experiment_name, "prequant-quantize", dataclasses.asdict(cfg)):
        for q in cfg.prequant.quant:
            for m in [m for m in cfg.prequant.methods if m in PEFT_METHODS]:
                r = run_prequant_quantize_stage(cfg, q, m)
                typer.echo(f"{m} {r.quant_config} {r.criterion or 'plain'}: {r.outlier_params} FP outlier params, "
                           f"budget used {r.budget_pct_used:.3f}%, {r.packed_bytes / 2**20:.2f} MB"
                           f"{' (reused)' if r.reused else ''} -> {r.directory}")


@app.command("prequant-finetune")
def prequant_finetune(config: Optional[Path] = ConfigArg, overrides: list[str] = SetOpt,
                      quant: list[str] = PrequantQuantOpt, method: list[str] = PrequantMethodOpt,
                      task: Optional[str] = typer.Option(None), model: Optional[str] = typer.Option(None),
                      output_dir: Optional[str] = typer.Option(None)) -> None:
    """PreQuant, per task: fine-tune each method from the stored low-bit model, export, evaluate."""
    from pipelines import tracking
    from pipelines.io import markdown_table, write_json_atomic, write_text_atomic
    from pipelines.prequant import check_artefacts, run_prequant_task

    cfg = _prequant_cfg(config, overrides, quant, method, task, model, output_dir)
    try:
        check_artefacts(cfg)  # before any work
    except FileNotFoundError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    with tracking.parent_run(cfg.experiment_name, "prequant-finetune", dataclasses.asdict(cfg)):
        rows = [row for t in cfg.tasks for row in run_prequant_task(cfg, t, quantize=False)]
    table = markdown_table(rows, ["task", "method", "metric", "value", "trainable_pct", "model_MB", "wall_s"])
    out = Path(cfg.output_dir).resolve()
    write_text_atomic(out / "prequant_results.md", table + "\n")
    write_json_atomic(out / "prequant_results.json", rows)
    typer.echo("\n" + table + "\n")
    typer.echo(_ui_hint())
# ---- end prequant


def main() -> None:
    try:
        app()
    except (ConfigError, FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
