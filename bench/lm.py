"""Causal-LM figures: WikiText-2 test perplexity of RTN, GPTQ, MREM-S and MREM-P on plmq's pretrained decoder.

    python -m bench.lm --decoder ~/.cache/plmq/lm-decoder/pretrain/.../model        # every config and method
    python -m bench.lm --decoder DIR --configs w2g64 --methods gptq mrem_p            # a subset (kept beside the rest)
    python -m bench.lm --decoder DIR --memory                                         # peak RSS per actor, K = 1, 2, 4
    python -m bench.lm --decoder tiny-llama --smoke                                   # the whole bench in a minute
    python -m bench.lm --decoder DIR --qpretrain QDIR   # the quantized pre-training gap: QDIR is the model folder of
                                                        # plmq pretrain configs/lm-decoder.yaml --recipe w8a8g8gw8m8v8
    python -m bench.lm --write-only                                                   # lm.md again from lm.json

The decoder is `plmq pretrain configs/lm-decoder.yaml`'s model folder. Each method runs through
pipelines.runner.run on the task `wikitext2` (calibration: WikiText-2 valid, evaluation: WikiText-2 test in
non-overlapping windows of the decoder's context), from the FP model the task adopts; the store resumes an
interrupted bench. Writes bench/results/lm.json and .md (each figure with its command) and logs them to MLflow.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import common

ROOT = common.ROOT
RESULTS = ROOT / "bench" / "results" / "lm.json"
CONFIGS = ["w4g128", "w3g128", "w2g64", "w4a8"]
METHODS = {"rtn": ("rtn", []), "gptq": ("gptq", []), "mrem_s": ("mrem", ["mrem.mode=sequential"]),
           "mrem_p": ("mrem", ["mrem.mode=parallel"])}
BASE = ["tasks=[wikitext2]", "rtn.calib_samples=128", "gptq.calib_samples=128", "mrem.calib_samples=128",
        "mrem.modules=2", "mrem.steps=300", "mrem.batch_size=4", "mrem.lr=1e-4", "mrem.eval_samples=32"]
SMOKE = ["data.max_length=32", "data.eval_examples=8", "evaluate.batch_size=4", "rtn.calib_samples=8",
         "gptq.calib_samples=8", "mrem.calib_samples=16", "mrem.steps=4", "mrem.shard_size=8",
         "mrem.calib_batch_size=8", "mrem.eval_samples=8"]


def config(args, *more: str):
    from pipelines.config import load_config

    context = [] if args.smoke else [f"data.max_length={decoder_context(args.decoder)}"]
    return load_config(None, [f"model={args.decoder}", f"output_dir={args.out_dir}", "experiment=bench-lm",
                              *BASE, *context, *(SMOKE if args.smoke else []), *args.set, *more])


def decoder_context(decoder: str) -> int:
    from pipelines import models

    hf = models.model_config(decoder)
    return int(getattr(hf, "max_position_embeddings", None) or hf.n_positions)


def run_method(args, method: str, quant: str) -> tuple[float, float, dict]:
    """(ppl, FP ppl, details) of one method at one QuantConfig."""
    from pipelines import runner

    section, extra = METHODS[method]
    cfg = config(args, f"{section}.quant=[{quant}]", *extra)
    start = time.time()
    summary = runner.run(cfg, name=f"bench-lm-{method}-{quant}")
    rows = {r["method"]: r for r in summary.rows}
    mine = next(r for m, r in rows.items() if m.startswith(f"{section}-"))
    detail = {"stage_wall_s": mine["wall_s"], "run_s": round(time.time() - start, 1),
              "fp_checkpoint": summary.outcomes["finetune/wikitext2"]["checkpoint"]}
    if section == "mrem":
        outcome = next(o for name, o in summary.outcomes.items() if name.startswith("mrem/"))
        info = outcome["info"]
        detail.update({k: info.get(k) for k in ("train_s", "calib_s", "modules")},
                      module_errors=info.get("chain_errors"), rtn_module_errors=info.get("rtn_chain_errors"),
                      peak_rss_mb=[s.get("peak_rss_mb") for s in info.get("modules_stats", [])],
                      model_mb=[round(s.get("model_mb") or 0, 2) for s in info.get("modules_stats", [])])
    return mine["value"], rows["fp"]["value"], detail


def peak_rss(args, k: int) -> tuple[dict, str]:
    """Per module actor of an MREM-P run with K modules (a few steps): peak RSS (MB) and the MB of its student
    and teacher tensors; and the FP checkpoint. K above this machine's cores runs on a fake cluster of K nodes."""
    more = argparse.Namespace(**{**vars(args), "set": [*args.set, f"mrem.modules={k}", "mrem.steps=5"]})
    with fake_nodes(k) if k > (os.cpu_count() or 1) else contextlib.nullcontext():
        _, _, detail = run_method(more, "mrem_p", "w4a8")
    out = {"peak_rss_mb": detail["peak_rss_mb"], "model_mb": detail["model_mb"]}
    if k > (os.cpu_count() or 1):
        out["cluster"] = f"ray.cluster_utils.Cluster: {k} nodes of 1 CPU on one {os.cpu_count()}-core machine"
    return out, detail["fp_checkpoint"]


@contextlib.contextmanager
def fake_nodes(k: int):
    """K one-CPU Ray nodes on this machine (`ray.cluster_utils.Cluster`), so K module actors run at once."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(k - 1):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        yield
    finally:
        ray.shutdown()
        cluster.shutdown()


SINGLE = """
import copy, resource, sys, torch
from pipelines import checkpoints
from pipelines import reconstruction as rc
from pipelines.partition import split_layers, layout
model = checkpoints.load(sys.argv[1]).model
spec = split_layers(layout(model).count, 1)[0]
student, teacher = rc.student_and_teacher(model, spec, "w4a8")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def single_process_rss(checkpoint: str) -> float:
    """Peak RSS (MB) of one process holding the whole model as MREM's student and teacher (no split)."""
    out = subprocess.run([sys.executable, "-c", SINGLE, checkpoint], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def load() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"configs": {}, "commands": {}}


def markdown(results: dict) -> str:
    rows = []
    for quant, fig in results.get("configs", {}).items():
        row = {"config": quant, "fp": results.get("fp_ppl")}
        row.update({m: fig.get(m) for m in METHODS})
        row.update({k: fig.get(k) for k in ("mrem_p_le_gptq", "increase_ratio_p_vs_gptq", "p_vs_s_pct")})
        row.update({f"{m}_s": fig.get("wall_s", {}).get(m) for m in METHODS})
        row["timing"] = "contended" if fig.get("timing_contended") else "alone"
        rows.append(row)
    mem = results.get("peak_rss_mb", {})
    lines = [f"# Causal-LM quantization on plmq's pretrained decoder (WikiText-2 test ppl, context "
             f"{results.get('context')})", "", f"Model: {json.dumps(results.get('model', {}))}", "",
             common.markdown_table(rows, list(rows[0])) if rows else "(no figures yet)", "",
             f"MREM-P (K=2) speed-up over MREM-S: {results.get('speedup_p2_vs_s')}x in module training time, "
             f"{results.get('speedup_p2_vs_s_stage')}x for the whole stage (with its evaluation of the export)", "",
             f"Peak RSS per actor (MB): {json.dumps(mem)}", "",
             f"Quantized pre-training gap: {json.dumps(results.get('qpretrain'))}", "", "Commands:", ""]
    lines += [f"- `{key}`: `{cmd}`" for key, cmd in results.get("commands", {}).items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decoder", default=None)
    parser.add_argument("--configs", nargs="*", default=CONFIGS)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--set", nargs="*", default=[])
    parser.add_argument("--out-dir", default="runs/bench-lm")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--ks", nargs="*", type=int, default=[1, 2, 4], help="--memory: module counts K")
    parser.add_argument("--smoke", action="store_true", help="tiny budgets; writes nothing to bench/results")
    parser.add_argument("--qpretrain", default=None, help="model folder of the quantized pre-training run")
    parser.add_argument("--write-only", action="store_true")
    args = parser.parse_args()
    results = {"configs": {}, "commands": {}} if args.smoke else load()
    command = "python -m bench.lm " + " ".join(sys.argv[1:])
    if not args.write_only:
        if not args.decoder:
            raise SystemExit("--decoder: the pretrained decoder's model folder (plmq pretrain configs/lm-decoder.yaml)")
        results["context"] = decoder_context(args.decoder)
        results["model"] = {"path": args.decoder, **model_facts(args.decoder)}
        if args.qpretrain:
            results["qpretrain"] = qpretrain_gap(args.decoder, args.qpretrain)
            results["commands"]["qpretrain"] = command
        elif args.memory:
            per_k = {f"k{k}": peak_rss(args, k) for k in args.ks}
            results["peak_rss_mb"] = {**results.get("peak_rss_mb", {}), **{k: v[0] for k, v in per_k.items()},
                                      "single_process": single_process_rss(next(iter(per_k.values()))[1])}
            results["commands"].pop("peak_rss_mb", None)  # the key of one command for every K, before --ks
            results["commands"].update({f"peak_rss_mb/{k}": command for k in per_k})
        else:
            record_methods(args, results, command)
    judge(results)
    if args.smoke:
        print(markdown(results))
        return
    common.write_results(RESULTS, results, markdown(results))
    print(markdown(results))


def record_methods(args, results: dict, command: str) -> None:
    """Run each method at each config, writing lm.json after every figure (an interrupted bench keeps them)."""
    for quant in args.configs:
        for method in args.methods:
            ppl, fp, detail = run_method(args, method, quant)
            fig = results["configs"].setdefault(quant, {"wall_s": {}, "details": {}})
            fig[method], fig["wall_s"][method], fig["details"][method] = ppl, detail["stage_wall_s"], detail
            results["fp_ppl"] = fp
            results["commands"][f"{quant}/{method}"] = command
            if not args.smoke:
                common.write_results(RESULTS, results, markdown(results))


def judge(results: dict) -> None:
    """The issue's targets per config (MREM-P against GPTQ and MREM-S) and the MREM-P (K=2) speed-up over MREM-S:
    of the modules' training time (`speedup_p2_vs_s`) and of the whole stage with its evaluation, over the configs
    whose runs had the machine to themselves (`timing_contended` names the others and why)."""
    fp, train, stage = results.get("fp_ppl"), [], []
    for fig in results.get("configs", {}).values():
        if fp and fig.get("mrem_p") and fig.get("gptq"):
            fig["mrem_p_le_gptq"] = fig["mrem_p"] <= fig["gptq"]
            fig["increase_ratio_p_vs_gptq"] = round((fig["mrem_p"] - fp) / max(fig["gptq"] - fp, 1e-9), 3)
        if fig.get("mrem_p") and fig.get("mrem_s"):
            fig["p_vs_s_pct"] = round(100 * (fig["mrem_p"] / fig["mrem_s"] - 1), 3)
            if fig.get("timing_contended"):  # timed while other work ran on the cores: not a speed figure
                continue
            d = fig["details"]
            train.append(d["mrem_s"]["train_s"] / d["mrem_p"]["train_s"])
            stage.append(fig["wall_s"]["mrem_s"] / fig["wall_s"]["mrem_p"])
    if train:
        results["speedup_p2_vs_s"] = round(sum(train) / len(train), 2)
        results["speedup_p2_vs_s_stage"] = round(sum(stage) / len(stage), 2)


def qpretrain_gap(decoder: str, quantized: str) -> dict:
    """Validation ppl (WikiText-2 test, the pretrain config's windows) of the FP decoder and of the same recipe
    trained with quantized weights, activations, gradients and optimizer states: each run's result.json."""
    fp, q = (json.loads((Path(d) / "result.json").read_text()) for d in (decoder, quantized))
    if (fp["steps"], fp["corpus"], fp["seed"]) != (q["steps"], q["corpus"], q["seed"]):
        raise SystemExit(f"--qpretrain {quantized}: trained differently from the decoder (steps, corpus, seed)")
    return {"fp_ppl": round(fp["val_ppl"], 2), f"{q['recipe']}_ppl": round(q["val_ppl"], 2),
            "gap_pct": round(100 * (q["val_ppl"] / fp["val_ppl"] - 1), 2),
            "val_loss_gap": round(q["val_loss"] - fp["val_loss"], 4), "recipe": q["recipe"], "path": quantized,
            "step_s": {"fp": round(fp["step_s"], 2), q["recipe"]: round(q["step_s"], 2)},
            "diverged": q["diverged"]}


def model_facts(decoder: str) -> dict:
    from pipelines import checkpoints, models

    hf = models.model_config(decoder)
    facts = {"architecture": (getattr(hf, "architectures", None) or [type(hf).__name__])[0],
             "layers": hf.num_hidden_layers, "hidden": hf.hidden_size, "vocab": hf.vocab_size}
    if Path(decoder).is_dir():
        meta = checkpoints.read_meta(decoder)
        facts.update({k: meta[k] for k in ("recipe", "corpus", "eval_corpus") if k in meta})
        result = Path(decoder) / "result.json"  # written by the pretrain stage
        if result.is_file():
            trained = json.loads(result.read_text())
            facts.update({k: trained[k] for k in ("params", "steps", "val_ppl", "step_s") if k in trained})
            train = meta.get("config", {}).get("train", {})
            block = meta.get("config", {}).get("model", {}).get("block_size")
            if train and block:
                facts["tokens_seen"] = trained["steps"] * train["batch_size"] * train["num_workers"] * block
    return facts


if __name__ == "__main__":
    main()
