"""`plmq`: `run` for a config's whole pipeline, and one verb per stage kind.

Every verb builds a plan of stages and runs it through the one driver (`pipelines.runner.run`).
Every verb takes an optional YAML config and `--set section.key=value` overrides; common flags
(--task, --model, --output-dir) are shortcuts for them.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import typer

from pipelines import stages as stage_plans
from pipelines.config import RunConfig, load_config
from pipelines.dag import describe
from pipelines.errors import ConfigError, DataError
from pipelines.prequant_model import quant_name
from pipelines.pretrain_config import PretrainRunConfig
from pipelines.runner import RunSummary, StageFailure
from pipelines.runner import run as run_plan
from pipelines.stages import Stage, pretrain, pretrain_report
from pipelines.tracking import tracking_uri

app = typer.Typer(help="plmq: quantize pre-trained language models on Ray.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)

ConfigArg = typer.Argument(None, help="YAML config file (see configs/)")
ConfigOpt = typer.Option(None, "--config", help="YAML config file (see configs/)")
SetOpt = typer.Option([], "--set", help="Override a config value: section.key=value (repeatable)")
TaskOpt = typer.Option(None, "--task", help="GLUE task, or language-modelling task: wikitext2, tinyshakespeare, "
                       "text:<file>, hub:<dataset>[:<config>] (overrides tasks)")
ModelOpt = typer.Option(None, "--model", help="model name or path")
OutOpt = typer.Option(None, "--output-dir", help="run directory: local path or pyarrow.fs URI")
QuantOpt = typer.Option([], "--quant", help="QuantConfig string, e.g. w4a8 (repeatable)")
ForceOpt = typer.Option([], "--force", help="recompute a stage (kind such as mrem, or a name such as "
                        "rtn/sst2/w4a8) and what depends on it; repeatable")
DryOpt = typer.Option(False, "--dry-run", help="print the planned stages and exit")


def fail(message: str, code: int = 2) -> None:
    typer.echo(message, err=True)
    raise typer.Exit(code)


def load(config: Path | None, overrides: list[str], task: str | None = None, model: str | None = None,
         output_dir: str | None = None, cls: type = RunConfig):
    extra = list(overrides)
    extra += [f"tasks=[{task}]"] if task else []
    extra += [f"model={model}"] if model else []
    extra += [f"output_dir={output_dir}"] if output_dir else []
    try:
        return load_config(config, extra, cls=cls)
    except ConfigError as err:
        fail(f"config error: {err}")


def ui_hint() -> str:
    return f"Browse the runs:  mlflow ui --backend-store-uri {tracking_uri()}  (then open http://127.0.0.1:5000)"


def execute(cfg, stages: list[Stage] | None, name: str, force: list[str] = (), dry_run: bool = False
            ) -> RunSummary | None:
    """Run a plan (or print it); bad input exits 2, failed stages exit 1 after the others finished."""
    if dry_run:
        for p in describe(cfg, stages if stages is not None else stage_plans.plan(cfg)):
            typer.echo(f"{p['name']:50s} key {p['key']}  after {', '.join(p['deps']) or '-'}")
        return None
    try:
        summary = run_plan(cfg, stages, force=list(force), name=name)
    except (ConfigError, DataError) as err:
        fail(f"config error: {err}")
    except StageFailure as err:
        typer.echo(str(err), err=True)
        fail(ui_hint(), 1)
    if summary.table:
        typer.echo("\n" + summary.table + "\n")
        typer.echo(f"Report files under {summary.output_dir}")
    typer.echo(f"wall time {summary.wall_s:.0f} s, {len(summary.skipped)} stage(s) already complete")
    typer.echo(ui_hint())
    return summary


def single(cfg, kinds: tuple[str, ...], name: str, checkpoint: Path | None = None, dry_run: bool = False):
    if checkpoint is not None and not checkpoint.is_dir():
        fail(f"checkpoint {checkpoint} is not a folder; pass a model folder written by a plmq stage")
    try:
        stages = stage_plans.plan_kinds(cfg, kinds, str(checkpoint.resolve()) if checkpoint else None)
    except ValueError as err:
        fail(f"error: {err}")
    return execute(cfg, stages, name, dry_run=dry_run)


@app.command()
def run(config: Path | None = ConfigArg, overrides: list[str] = SetOpt, task: str | None = TaskOpt,
        model: str | None = ModelOpt, output_dir: str | None = OutOpt, force: list[str] = ForceOpt,
        dry_run: bool = DryOpt) -> None:
    """Run the whole pipeline of a config: finetune, evaluate, rtn, gptq, calibrate, mrem, prequant, report.

    Stages already complete in the run directory (same inputs) are skipped."""
    cfg = load(config, overrides, task, model, output_dir)
    execute(cfg, None, f"run-{'-'.join(cfg.tasks)}", force, dry_run)


@app.command()
def finetune(config: Path | None = ConfigArg, overrides: list[str] = SetOpt, task: str | None = TaskOpt,
             model: str | None = ModelOpt, output_dir: str | None = OutOpt, dry_run: bool = DryOpt) -> None:
    """Full-precision fine-tuning of the model on each GLUE task (Ray Train); an LM task adopts the model as is."""
    single(load(config, overrides, task, model, output_dir), ("finetune",), "finetune", dry_run=dry_run)


@app.command()
def evaluate(checkpoint: Path = typer.Argument(..., help="model folder written by a plmq stage"),
             config: Path | None = ConfigOpt, overrides: list[str] = SetOpt, task: str | None = TaskOpt,
             output_dir: str | None = OutOpt, dry_run: bool = DryOpt) -> None:
    """GLUE dev metrics, or perplexity on a language-modelling task, of a model folder (FP or any quantized export)."""
    single(load(config, overrides, task, None, output_dir), ("evaluate",), "evaluate", checkpoint, dry_run)


@app.command()
def rtn(checkpoint: Path = typer.Argument(..., help="fine-tuned model folder"), quant: list[str] = QuantOpt,
        config: Path | None = ConfigOpt, overrides: list[str] = SetOpt, task: str | None = TaskOpt,
        output_dir: str | None = OutOpt, dry_run: bool = DryOpt) -> None:
    """Round-to-nearest post-training quantization of a checkpoint, exported packed and evaluated."""
    extra = [f"rtn.quant=[{','.join(quant)}]"] if quant else []
    cfg = load(config, list(overrides) + extra, task, None, output_dir)
    if not cfg.rtn.quant:
        fail("config error: no QuantConfig: pass --quant w4a8 or set rtn.quant")
    single(cfg, ("rtn",), "rtn", checkpoint, dry_run)


@app.command()
def gptq(checkpoint: Path = typer.Argument(..., help="fine-tuned model folder (or an adopted causal LM)"),
         quant: list[str] = QuantOpt, config: Path | None = ConfigOpt, overrides: list[str] = SetOpt,
         task: str | None = TaskOpt, output_dir: str | None = OutOpt, dry_run: bool = DryOpt) -> None:
    """GPTQ post-training quantization of a checkpoint (block by block on calibration inputs), exported packed
    and evaluated."""
    extra = [f"gptq.quant=[{','.join(quant)}]"] if quant else []
    cfg = load(config, list(overrides) + extra, task, None, output_dir)
    if not cfg.gptq.quant:
        fail("config error: no QuantConfig: pass --quant w4g128 or set gptq.quant")
    single(cfg, ("gptq",), "gptq", checkpoint, dry_run)


@app.command()
def mrem(checkpoint: Path = typer.Argument(..., help="fine-tuned model folder (the teacher)"),
         quant: list[str] = QuantOpt, mode: str | None = typer.Option(None, help="parallel | sequential | rem"),
         cache_dir: str | None = typer.Option(None, "--cache-dir", help="where calibration shards are kept"),
         config: Path | None = ConfigOpt, overrides: list[str] = SetOpt, task: str | None = TaskOpt,
         output_dir: str | None = OutOpt, dry_run: bool = DryOpt) -> None:
    """Module-wise reconstruction (MREM) on Ray actors: calibrate, train modules, export, evaluate."""
    extra = [f"mrem.quant=[{','.join(quant)}]"] if quant else []
    extra += [f"mrem.mode={mode}"] if mode else []
    extra += [f"mrem.cache_dir={cache_dir}"] if cache_dir else []
    cfg = load(config, list(overrides) + extra, task, None, output_dir)
    if not cfg.mrem.quant:
        fail("config error: no QuantConfig: pass --quant w4a8 or set mrem.quant")
    single(cfg, ("calibrate", "mrem", "mrem-e2e"), "mrem", checkpoint, dry_run)


@app.command()
def export(checkpoint: Path = typer.Argument(..., help="quantized model folder (rtn, gptq, mrem, prequant)"),
           format: list[str] = typer.Option([], "--format", help="onnx | compressed-tensors (repeatable)"),
           runtime: str | None = typer.Option(None, help="what runs an ONNX export: onnxruntime | openvino"),
           config: Path | None = ConfigOpt, overrides: list[str] = SetOpt, task: str | None = TaskOpt,
           output_dir: str | None = OutOpt, dry_run: bool = DryOpt) -> None:
    """Write a quantized model in a format other runtimes load (ONNX: ONNX Runtime, OpenVINO; compressed-tensors:
    transformers, vLLM), then evaluate and time it in that runtime."""
    extra = [f"export.formats=[{','.join(format)}]"] if format else []
    extra += [f"export.runtime={runtime}"] if runtime else []
    cfg = load(config, list(overrides) + extra, task, None, output_dir)
    if not cfg.export.formats:
        fail("config error: no format: pass --format onnx (or compressed-tensors) or set export.formats")
    single(cfg, ("export",), "export", checkpoint, dry_run)


def load_pretrain(config: Path | None, overrides: list[str], recipe: str | None, corpus: str | None,
                  output_dir: str | None) -> PretrainRunConfig:
    extra = [f"quant.recipe={recipe}"] if recipe else []
    extra += [f"data.corpus={corpus}"] if corpus else []
    return load(config, list(overrides) + extra, None, None, output_dir, cls=PretrainRunConfig)


@app.command("pretrain")
def pretrain_verb(config: Path | None = ConfigArg, overrides: list[str] = SetOpt,
                  recipe: str | None = typer.Option(None, help="quantization recipe, e.g. fp, w8a8g8, w4, m8v8"),
                  corpus: str | None = typer.Option(None, help="tinyshakespeare, wikitext2, a text file, or several "
                                                    "joined by + (tinyshakespeare+wikitext2)"),
                  output_dir: str | None = OutOpt, force: list[str] = ForceOpt, dry_run: bool = DryOpt,
                  sweep: bool = typer.Option(False, "--sweep", help="run the config's sweep grid instead")) -> None:
    """Pre-train a GPT-2 or Llama from scratch with quantized weights/activations/gradients/optimizer states."""
    cfg = load_pretrain(config, overrides, recipe, corpus, output_dir)
    if sweep:
        return pretrain_sweep(config, overrides, force, dry_run)
    try:
        stages = pretrain.plan(cfg)
    except (ConfigError, DataError) as err:
        fail(f"config error: {err}")
    execute(cfg, stages, "pretrain", force, dry_run)


@app.command("pretrain-sweep")
def pretrain_sweep(config: Path | None = ConfigArg, overrides: list[str] = SetOpt, force: list[str] = ForceOpt,
                   dry_run: bool = DryOpt) -> None:
    """Pre-train every recipe x corpus x seed of the config's sweep section at once, then compare them."""
    cfg = load_pretrain(config, overrides, None, None, None)
    try:
        stages = pretrain.plan_sweep(cfg)
    except (ConfigError, DataError) as err:
        fail(f"config error: {err}")
    execute(cfg, stages + pretrain_report.plan(cfg), "pretrain-sweep", force, dry_run)


PrequantQuantOpt = typer.Option([], "--quant", help="QuantConfig with quantized weights, e.g. w4 (repeatable)")
PrequantMethodOpt = typer.Option([], "--method", help="prequant | random | lora | bitfit (repeatable)")


def prequant_cfg(config, overrides, quant, method, task=None, model=None, output_dir=None) -> RunConfig:
    extra = [f"prequant.quant=[{','.join(quant)}]"] if quant else []
    extra += [f"prequant.methods=[{','.join(method)}]"] if method else []
    cfg = load(config, list(overrides) + extra, task, model, output_dir)
    if not cfg.prequant.quant:
        fail("config error: no QuantConfig: pass --quant w4 or set prequant.quant")
    return cfg


@app.command("prequant-quantize")
def prequant_quantize(config: Path | None = ConfigArg, overrides: list[str] = SetOpt,
                      quant: list[str] = PrequantQuantOpt, method: list[str] = PrequantMethodOpt,
                      model: str | None = ModelOpt, output_dir: str | None = OutOpt,
                      dry_run: bool = DryOpt) -> None:
    """PreQuant, task-agnostic: quantize the pre-trained model once (low-bit + FP outlier columns)."""
    cfg = prequant_cfg(config, overrides, quant, method, None, model, output_dir)
    single(cfg, ("prequant-quantize",), "prequant-quantize", dry_run=dry_run)


@app.command("prequant-finetune")
def prequant_finetune(config: Path | None = ConfigArg, overrides: list[str] = SetOpt,
                      quant: list[str] = PrequantQuantOpt, method: list[str] = PrequantMethodOpt,
                      task: str | None = TaskOpt, model: str | None = ModelOpt,
                      output_dir: str | None = OutOpt, dry_run: bool = DryOpt) -> None:
    """PreQuant, per task: fine-tune each method from the stored low-bit model (quantized first when the
    store has none with the same inputs), export, evaluate; `fp` and `rtn` in prequant.methods add the FP
    fine-tune and its RTN baselines."""
    cfg = prequant_cfg(config, overrides, quant, method, task, model, output_dir)
    methods = set(cfg.prequant.methods)
    baselines = ("finetune",) * bool({"fp", "rtn"} & methods) + ("evaluate",) * ("fp" in methods)
    if "rtn" in methods:  # RTN of the FP fine-tune on the same grids as the PreQuant bases
        quants = [quant_name(q, cfg.prequant) for q in cfg.prequant.quant]
        cfg = dataclasses.replace(cfg, rtn=dataclasses.replace(cfg.rtn, quant=quants))
        baselines += ("rtn",)
    single(cfg, (*baselines, "prequant-quantize", "prequant-finetune"), "prequant-finetune", dry_run=dry_run)


def main() -> None:
    try:
        app()
    except (ConfigError, DataError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
