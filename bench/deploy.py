"""Deployed quantized models: accuracy, latency and size of MiniLM SST-2 in torch, plmq's fake quantization,
ONNX Runtime (FP32 and int8), OpenVINO (int8) and transformers (compressed-tensors).

    python -m bench.deploy --run runs/demo --run runs/deploy-mrem

Models: the first run's FP fine-tune (a finished `make demo` folder), the rtn and parallel-mrem exports of every run
folder (a later one wins for the same label; `plmq mrem CKPT` writes `*-parallel-ckpt-<hash>` folders), and RTN at
W2A8 and w4g128a16 computed here from the FP model (rtn.calib_samples=512). Each is exported with plmq's own stage
code (checkpoints.save in format onnx or compressed-tensors) and evaluated on the whole SST-2 dev split in its
runtime. Latency: one forward of batch 32 x 64 tokens, the median over interleaved rounds (every runtime once per
round), 2 threads for all.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import common

RESULTS = common.ROOT / "bench" / "results" / "deploy.json"
THREADS = 2
ROUNDS = 15


def models_of(runs: list[Path], tmp: Path) -> dict[str, str]:
    """{label: plmq checkpoint folder}: FP, the runs' quantized exports, RTN W2A8 and w4g128a16 made here."""
    from pipelines.config import load_config
    from pipelines.stages import Context, rtn

    found = {"fp": runs[0] / "sst2" / "finetune" / "model"}
    for run in runs:
        found.update({f"rtn-{p.name}": p for p in sorted((run / "sst2" / "rtn").glob("w*"))})
        found.update({f"mrem-p-{p.name.split('-parallel')[0]}": p / "model"
                      for p in sorted((run / "sst2" / "mrem").glob("*-parallel*")) if (p / "model").is_dir()})
    for quant in ("w2a8", "w4g128a16"):
        cfg = load_config(None, [f"output_dir={tmp}", f"rtn.quant=[{quant}]"])
        (stage,) = rtn.plan(cfg, str(found["fp"]))
        found[f"rtn-{quant}"] = Path(rtn.run(cfg, stage, {}, Context(tmp / "rtn", "bench")).checkpoint)
    return {k: str(v) for k, v in found.items()}


def runtimes_of(label: str, folder: str, tmp: Path) -> dict:
    """{runtime: model with .logits} for one checkpoint, plus the files each one reads."""
    from pipelines import checkpoints
    from pipelines.runtimes import OnnxModel, example_inputs
    from quant.deploy.onnx import trace

    loaded = checkpoints.load(folder)
    out = {("torch-fp32" if label == "fp" else "plmq-fakequant"): (loaded.model, loaded.nbytes, None)}
    onnx_dir = tmp / f"{label}-onnx"
    if label == "fp":
        path = onnx_dir / "model.onnx"
        trace(loaded.model, example_inputs(loaded.model), path)  # the FP model, as plmq traces its exports
        out["ort-fp32"] = (OnnxModel(path), path.stat().st_size, None)
        return out
    from quant import QuantConfig
    from quant.deploy import problem

    if problem(loaded.meta["quant"], "onnx") is None:
        t0 = time.time()
        nbytes = checkpoints.save(loaded.model, loaded.tokenizer, onnx_dir, loaded.meta, "onnx")
        export_s = round(time.time() - t0, 1)
        kind = "int8" if QuantConfig.parse(loaded.meta["quant"]).act else "nbits"  # weight-only: MatMulNBits
        out[f"ort-{kind}"] = (OnnxModel(onnx_dir / "model.onnx"), nbytes, export_s)
        out[f"openvino-{kind}"] = (OnnxModel(onnx_dir / "model.onnx", "openvino"), nbytes, export_s)
    if problem(loaded.meta["quant"], "compressed-tensors") is None:
        ct, t0 = tmp / f"{label}-ct", time.time()
        nbytes = checkpoints.save(loaded.model, loaded.tokenizer, ct, loaded.meta, "compressed-tensors")
        out["transformers-ct"] = (checkpoints.load(ct).model, nbytes, round(time.time() - t0, 1))
    return out


def accuracy(model, tokenizer) -> float:
    from pipelines.config import DataConfig, EvaluateConfig
    from pipelines.evaluation import evaluate_model

    return round(100 * evaluate_model(model, tokenizer, "sst2", DataConfig(), EvaluateConfig(32), device="cpu").main,
                 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", help="a finished plmq run folder with sst2 exports (repeatable; "
                        "the first also holds the FP fine-tune); default runs/demo")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    torch.set_num_threads(THREADS)
    from pipelines import checkpoints, runtimes
    from quant import quant_modules

    start, load_before = time.time(), [round(x, 2) for x in os.getloadavg()]
    rows, models, int_matmuls, linears = [], {}, None, None
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        args.run = args.run or ["runs/demo"]
        folders = models_of([Path(r) for r in args.run], tmp)
        tokenizer = checkpoints.load(folders["fp"]).tokenizer
        for label, folder in folders.items():
            for runtime, (model, nbytes, export_s) in runtimes_of(label, folder, tmp).items():
                models[(label, runtime)] = model
                rows.append({"model": label, "runtime": runtime, "accuracy": accuracy(model, tokenizer),
                             "bytes": nbytes, "export_s": export_s})
                print(rows[-1], flush=True)
            if label == "rtn-w8a8":
                int_matmuls = runtimes.integer_matmuls(tmp / f"{label}-onnx" / "model.onnx")
                linears = sum(1 for _ in quant_modules(checkpoints.load(folder).model))
        lat = {k: round(v, 2) for k, v in runtimes.latencies(models, tokenizer, 32, 64, ROUNDS).items()}
    for r in rows:
        r["latency_ms"] = lat[(r["model"], r["runtime"])]
    results = summarize(rows, int_matmuls, linears, load_before, time.time() - start, args)
    print(markdown(results))
    common.write_results(RESULTS, results, markdown(results))


def summarize(rows: list[dict], int_matmuls, linears, load_before, wall_s: float, args) -> dict:
    by = {(r["model"], r["runtime"]): r for r in rows}
    torch_fp, ort_fp, ort_int8 = by[("fp", "torch-fp32")], by[("fp", "ort-fp32")], by.get(("rtn-w8a8", "ort-int8"))
    fake = {r["model"]: r["accuracy"] for r in rows if r["runtime"] == "plmq-fakequant"}
    deltas = [abs(r["accuracy"] - fake[r["model"]]) for r in rows
              if r["runtime"] in ("ort-int8", "ort-nbits", "transformers-ct")]
    return {"rows": rows,
            "speedup_ort_int8_vs_torch_fp32": round(torch_fp["latency_ms"] / ort_int8["latency_ms"], 2),
            "speedup_ort_int8_vs_ort_fp32": round(ort_fp["latency_ms"] / ort_int8["latency_ms"], 2),
            "accuracy_delta_vs_plmq": round(max(deltas), 2), "int_matmuls": int_matmuls,
            "quantized_linears": linears,
            # the writer compares the codes it stored with plmq's before it publishes the folder
            "compressed_tensors_identical": any(r["runtime"] == "transformers-ct" for r in rows),
            "export_s_max": max((r["export_s"] for r in rows if r["export_s"] is not None), default=None),
            "command": "python -m bench.deploy " + " ".join(f"--run {r}" for r in args.run),
            "threads": THREADS, "rounds": ROUNDS,
            "batch": [32, 64], "load_avg_before": load_before,
            "load_avg_after": [round(x, 2) for x in os.getloadavg()], "wall_s": round(wall_s),
            "machine": f"{os.cpu_count()} cores, no GPU, python {sys.version.split()[0]}"}


def markdown(results: dict) -> str:
    from pipelines.io import markdown_table

    head = (f"# Deployed MiniLM SST-2: runtimes, accuracy, latency\n\nONNX Runtime int8 (rtn-w8a8) is "
            f"{results['speedup_ort_int8_vs_torch_fp32']}x torch FP32 and {results['speedup_ort_int8_vs_ort_fp32']}x "
            f"ONNX Runtime FP32; largest accuracy difference of a deployed model from plmq's own evaluation "
            f"{results['accuracy_delta_vs_plmq']} points; integer matmuls {results['int_matmuls']} of "
            f"{results['quantized_linears']} quantized Linears; slowest export {results['export_s_max']} s.\n")
    table = markdown_table(results["rows"], ["model", "runtime", "accuracy", "latency_ms", "bytes", "export_s"])
    tail = (f"\nCommand: `{results['command']}` ({results['machine']}; {results['threads']} threads, batch 32 x 64, "
            f"median of {results['rounds']} interleaved rounds; load average before {results['load_avg_before']}, "
            f"after {results['load_avg_after']}; {results['wall_s']} s)\n")
    return head + "\n" + table + "\n" + tail


if __name__ == "__main__":
    main()
