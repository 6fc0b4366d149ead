"""Stage `export`: a quantized model written in a format other runtimes load (ONNX for ONNX Runtime and
OpenVINO, compressed-tensors for transformers and vLLM), then evaluated and timed in that runtime, so the
report's figures for it come from the deployed artefact.

Planned after each rtn, gptq, mrem and prequant-finetune stage for every format of `export.formats`
(`plan_after`), or on a user's checkpoint (`plmq export CHECKPOINT --format onnx`). A QuantConfig a format cannot
hold is refused when the run is planned, naming the formats that can.
"""
from __future__ import annotations

import dataclasses
import shutil
import time

from pipelines import checkpoints, models, runtimes
from pipelines.config import RunConfig
from pipelines.config_dict import to_dict
from pipelines.errors import ConfigError
from pipelines.evaluation import eval_metrics, evaluate_model, report_row, task_fragment
from pipelines.stages.base import Context, Stage, StageResult, export_folder, relative
from pipelines.tasks import check_task
from quant.deploy import problem, working_formats

KIND = "export"
TASK_CPUS = 1
SOURCES = ("rtn", "gptq", "mrem", "mrem-e2e", "prequant-finetune")
RESOURCES = {"cpus": 1, "gpus": 0}


def check(quant: str, fmt: str, what: str, prequant: bool = False) -> None:
    """Raise ConfigError when `fmt` cannot hold a model quantized with `quant` (by PreQuant: with FP columns)."""
    if prequant and fmt == "compressed-tensors":
        raise ConfigError(f"export.formats: {what} is a PreQuant model: its FP outlier columns have no "
                          "compressed-tensors scheme; export it to onnx (weight-only PreQuant runs as MatMulNBits "
                          "plus a float matmul on its columns)")
    why = problem(quant, fmt)
    if why:
        works = working_formats(quant)
        raise ConfigError(f"export.formats: {what} ({quant}) cannot be exported to {fmt}: {why}. Formats that take "
                          f"{quant}: {', '.join(works) or 'none'}; onnx takes w8a8, w4a8, w2a8 and w4g128a16, "
                          "compressed-tensors also -e8 embeddings")


def plan(cfg: RunConfig, checkpoint: str | None = None) -> list[Stage]:
    """On a user's checkpoint: one stage per task and format, its QuantConfig checked against each format now."""
    if not checkpoint:
        return []
    meta = checkpoints.read_meta(checkpoint)
    quant = meta.get("quant")
    if not quant:
        raise ConfigError(f"{checkpoint} is not quantized (its {checkpoints.META_FILE} names no quant): export a "
                          "model written by rtn, gptq, mrem or prequant-finetune")
    for fmt in cfg.export.formats:
        check(quant, fmt, checkpoint, prequant=meta["format"] == "prequant")
    check_family(checkpoint)
    return [Stage(f"{KIND}/{t}/checkpoint/{fmt}", KIND, t, method=fmt, checkpoint=checkpoint)
            for t in cfg.tasks for fmt in cfg.export.formats]


def check_family(model: str) -> None:
    """GPT-2 keeps its Linears as Conv1D (weights stored [in, out]): neither format takes them."""
    if models.model_config(model).model_type == "gpt2":
        raise ConfigError(f"export.formats: {model} is a GPT-2, whose Conv1D layers neither ONNX export nor "
                          "compressed-tensors takes; export a model of another family (BERT, Llama, Qwen, Mistral)")


def plan_after(cfg: RunConfig, stages: list[Stage]) -> list[Stage]:
    """One stage per quantized model of `stages` and format."""
    if cfg.export.formats and any(s.kind in SOURCES for s in stages):
        check_family(cfg.model)
    out = []
    for s in stages:
        if s.kind not in SOURCES:
            continue
        for fmt in cfg.export.formats:
            check(s.quant, fmt, s.name, prequant=s.kind == "prequant-finetune")
            out.append(Stage(f"{KIND}/{s.name}/{fmt}", KIND, s.task, s.quant, method=fmt, deps=(s.name,)))
    return out


def fragment(cfg: RunConfig, stage: Stage) -> dict:
    ex = cfg.export
    given = {"checkpoint": models.identity(stage.checkpoint)} if stage.checkpoint else {}
    return {"task": stage.task, **task_fragment(stage.task), **given, "format": stage.method,
            "act_type": ex.act_type, "runtime": ex.runtime, "data": to_dict(cfg.data),
            "evaluate": to_dict(cfg.evaluate), "latency": [ex.latency_batch, ex.latency_tokens, ex.latency_runs]}


def run(cfg: RunConfig, stage: Stage, upstream: dict, ctx: Context) -> StageResult:
    fmt, start = stage.method, time.time()
    source = stage.checkpoint or next(iter(upstream.values()))["checkpoint"]
    loaded = checkpoints.load(source)
    quant = loaded.meta.get("quant")
    if not quant:
        raise ConfigError(f"{source} is not quantized (its {checkpoints.META_FILE} names no quant): export a model "
                          "written by rtn, gptq, mrem or prequant-finetune")
    check(quant, fmt, source, prequant=loaded.meta["format"] == "prequant")
    rest = stage.name.removeprefix(f"{KIND}/").replace("/", "-")  # e.g. rtn-sst2-w8a8-onnx
    out = export_folder(ctx.root / check_task(stage.task).slug / KIND / rest, stage)
    if ctx.force:
        shutil.rmtree(out, ignore_errors=True)
    meta = {**loaded.meta, "exported_from": source, "act_type": cfg.export.act_type, "runtime": cfg.export.runtime}
    nbytes = checkpoints.save(loaded.model, loaded.tokenizer, out, meta, fmt)
    export_s = time.time() - start
    deployed = checkpoints.load(out)
    result = evaluate_model(deployed.model, deployed.tokenizer, stage.task, cfg.data, cfg.evaluate,
                            model_bytes=nbytes, device="cpu")
    latency_ms = runtimes.latencies({"model": deployed.model}, deployed.tokenizer, cfg.export.latency_batch,
                                    cfg.export.latency_tokens, cfg.export.latency_runs)["model"]
    wall_s = time.time() - start
    runtime = cfg.export.runtime if fmt == "onnx" else "transformers"
    row = report_row(stage.task, f"{loaded.meta.get('method', 'checkpoint')}-{quant}@{runtime}", result, wall_s,
                     quant, 0.0, RESOURCES)
    row["latency_ms"] = round(latency_ms, 2)
    info = {"format": fmt, "runtime": runtime, "source": source, "bytes": nbytes, "export_s": round(export_s, 2),
            "latency_ms": latency_ms, "wall_s": wall_s, "eval": dataclasses.asdict(result)}
    metrics = {**eval_metrics(result), "bytes": nbytes, "export_s": export_s, "latency_ms": latency_ms,
               "wall_s": wall_s}
    return StageResult(outputs=relative(out, ctx.root), checkpoint=str(out), row=row, metrics=metrics, info=info,
                       resources=RESOURCES)
