"""GPU figures, short enough for one GPU in a few minutes (bench/gpu.sh runs them after the gpu-marked tests).

    python -m bench.gpu                                  # every figure; bench/results/gpu.json and .md
    PLMQ_LM_DECODER=<causal-LM folder> python -m bench.gpu   # the decoder figure on that model (else tiny-llama)

- finetune: MiniLM fine-tuned on SST-2 with Ray Train on CUDA: examples/s measured in the worker, against the
  CPU figure recorded in fp_reference.json (examples x epochs / that run's wall time);
- mrem: MREM-P W4A8 from that fine-tuned model, K = 2 module actors sharing one GPU (gpus_per_actor 0.5) vs
  K = 1 on a whole GPU, same steps per module: wall time, s/step and peak CUDA memory of every actor;
- decoder: MREM-P with K = 2 actors sharing one GPU on a causal LM (wikitext2, perplexity).

Every figure runs through pipelines.runner.run in a fresh folder under runs/gpu_bench/. Figures past
--budget-s are not run (listed under not_run). Without a CUDA GPU nothing runs and nothing is recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench import common
from pipelines.config import load_config

ROOT = common.ROOT
RESULTS = ROOT / "bench" / "results" / "gpu.json"
FINETUNE = ["model=minilm-l6", "tasks=[sst2]", "data.max_length=128", "finetune.epochs=1",
            "finetune.batch_size=32", "finetune.lr=1e-4", "finetune.use_gpu=true", "finetune.cpus_per_worker=2",
            "finetune.log_every=50"]
MREM = ["mrem.quant=[w4a8]", "mrem.mode=parallel", "mrem.use_gpu=true", "mrem.batch_size=16", "mrem.lr=5e-5",
        "mrem.calib_samples=512", "mrem.shard_size=256", "mrem.eval_samples=128", "mrem.log_every=50",
        "mrem.checkpoint_every=100"]
SHARES = {"k2_half_gpu": (2, 0.5), "k1_whole_gpu": (1, 1.0)}  # figure -> (K, gpus_per_actor)
MODULE_STATS = ("module", "layers", "device", "gpu_ids", "s_per_step", "wall_s", "peak_cuda_mb", "peak_rss_mb")


def machine() -> dict:
    import torch

    return {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cpus": os.cpu_count()}


def run_stages(cfg, kinds: tuple[str, ...], checkpoint: str | None, name: str) -> dict:
    """The stages of `kinds` through the driver; their outcomes by stage name."""
    from pipelines import runner
    from pipelines.stages import plan_kinds

    stages = plan_kinds(cfg, kinds, checkpoint, with_report=False)
    return runner.run(cfg, stages, name=name).outcomes


def cpu_finetune_rate() -> dict | None:
    """The CPU fine-tune figure recorded in fp_reference.json for SST-2, as examples/s."""
    if not common.FP.exists():
        return None
    sst2 = json.loads(common.FP.read_text()).get("sst2")
    if not sst2 or not sst2.get("wall_s"):
        return None
    rate = sst2["train_examples"] * sst2["epochs"] / sst2["wall_s"]
    return {"examples_per_s": round(rate, 1), "source": "bench/results/fp_reference.json sst2: train_examples x "
            "epochs / wall_s (fine-tune stage plus evaluation, max_length 128, batch 32)",
            "machine": json.loads(common.FP.read_text()).get("machine")}


def finetune_figure(out: Path, args) -> tuple[dict, str]:
    """(figure, the fine-tuned checkpoint)."""
    cfg = load_config(None, [*FINETUNE, f"output_dir={out / 'finetune'}", f"data.train_examples={args.train_examples}",
                             "experiment=plmq-gpu-bench"])
    outcomes = run_stages(cfg, ("finetune", "evaluate"), None, "bench-gpu-finetune")
    ft, fp = outcomes["finetune/sst2"], outcomes["evaluate/sst2/fp"]
    meta = json.loads((Path(ft["checkpoint"]) / "plmq_meta.json").read_text())
    cpu = cpu_finetune_rate()
    info = ft["info"]
    figure = {"model": "minilm-l6", "train_examples": info["train_examples"], "epochs": 1, "batch_size": 32,
              "device": info["device"], "examples_per_s": info["examples_per_s"], "train_s": info["train_s"],
              "stage_wall_s": round(info["wall_s"], 1), "peak_cuda_mb": meta.get("peak_cuda_mb"),
              "accuracy": fp["row"]["value"], "eval_device": fp["info"]["device"], "cpu_recorded": cpu,
              "speedup_vs_cpu_recorded": round(info["examples_per_s"] / cpu["examples_per_s"], 1) if cpu else None}
    return figure, ft["checkpoint"]


def mrem_figure(out: Path, checkpoint: str, k: int, share: float, args) -> dict:
    """MREM-P W4A8 on `checkpoint` with K actors of `share` GPUs each."""
    cfg = load_config(None, ["model=minilm-l6", "tasks=[sst2]", "data.max_length=128", *MREM,
                             f"mrem.steps={args.mrem_steps}", f"mrem.modules={k}", f"mrem.gpus_per_actor={share}",
                             f"output_dir={out / f'mrem-k{k}'}", "experiment=plmq-gpu-bench"])
    outcomes = run_stages(cfg, ("calibrate", "mrem"), checkpoint, f"bench-gpu-mrem-k{k}")
    info = outcomes["mrem/sst2/w4a8-parallel"]["info"]
    return {"modules": info["modules"], "gpus_per_actor": share, "steps_per_module": args.mrem_steps,
            "train_s": info["train_s"], "stage_wall_s": info["wall_s"], "calib_s": info["calib_s"],
            "accuracy": outcomes["mrem/sst2/w4a8-parallel"]["row"]["value"], "eval_device": info["eval"]["device"],
            "actors": [{key: s.get(key) for key in MODULE_STATS} for s in info["modules_stats"]]}


def decoder_figure(out: Path, args) -> dict:
    """MREM-P with 2 actors sharing one GPU on PLMQ_LM_DECODER (a causal-LM folder) or tiny-llama, on wikitext2."""
    model = os.environ.get("PLMQ_LM_DECODER") or "tiny-llama"
    if model != "tiny-llama" and not Path(model).is_dir():
        raise SystemExit(f"PLMQ_LM_DECODER={model}: not a folder; point it at a causal-LM checkpoint folder "
                         "(e.g. the model folder of `plmq pretrain configs/lm-decoder.yaml`) or unset it")
    cfg = load_config(None, [f"model={model}", "tasks=[wikitext2]", "data.max_length=128", "data.eval_examples=64",
                             "evaluate.batch_size=16", *MREM, f"mrem.quant=[{args.lm_quant}]", "mrem.batch_size=8",
                             "mrem.calib_samples=256", "mrem.shard_size=64", "mrem.eval_samples=64",
                             f"mrem.steps={args.mrem_steps}", "mrem.modules=2", "mrem.gpus_per_actor=0.5",
                             f"output_dir={out / 'decoder'}", "experiment=plmq-gpu-bench"])
    outcomes = run_stages(cfg, ("finetune", "evaluate", "calibrate", "mrem"), None, "bench-gpu-decoder")
    mrem = next(v for k, v in outcomes.items() if k.startswith("mrem/"))
    info = mrem["info"]
    return {"model": model, "quant": info["quant_config"], "modules": info["modules"], "gpus_per_actor": 0.5,
            "steps_per_module": args.mrem_steps, "fp_ppl": outcomes["evaluate/wikitext2/fp"]["row"]["value"],
            "mrem_ppl": mrem["row"]["value"], "train_s": info["train_s"], "stage_wall_s": info["wall_s"],
            "eval_device": info["eval"]["device"],
            "actors": [{key: s.get(key) for key in MODULE_STATS} for s in info["modules_stats"]]}


def rows(results: dict) -> list[dict]:
    """One line per measured run for the page."""
    out, ft = [], results.get("finetune")
    if ft:
        cpu = ft.get("cpu_recorded") or {}
        out.append({"figure": "finetune", "setting": f"MiniLM SST-2, {ft['train_examples']} examples, 1 epoch",
                    "device": ft["device"], "examples_per_s": ft["examples_per_s"], "train_s": ft["train_s"],
                    "peak_cuda_MB": ft["peak_cuda_mb"], "metric": ft["accuracy"],
                    "vs": f"CPU recorded {cpu.get('examples_per_s')} ex/s" if cpu else None})
    for key, fig in {**results.get("mrem", {}), "decoder": results.get("decoder")}.items():
        if not isinstance(fig, dict) or "actors" not in fig:
            continue
        actors = fig["actors"]
        out.append({"figure": f"mrem {key}", "setting": f"K={fig['modules']}, {fig['gpus_per_actor']} GPU/actor, "
                    f"{fig['steps_per_module']} steps" + (f", {fig['model']}" if key == "decoder" else ""),
                    "device": ",".join(sorted({str(a["device"]) for a in actors})), "train_s": fig["train_s"],
                    "s_per_step": [round(a["s_per_step"], 4) for a in actors],
                    "peak_cuda_MB": [None if a["peak_cuda_mb"] is None else round(a["peak_cuda_mb"]) for a in actors],
                    "gpu_ids": [a["gpu_ids"] for a in actors],
                    "metric": fig.get("mrem_ppl", fig.get("accuracy"))})
    return out


COLUMNS = ["figure", "setting", "device", "examples_per_s", "train_s", "s_per_step", "peak_cuda_MB", "gpu_ids",
           "metric", "vs"]


def write(results: dict, path: Path) -> None:
    m = results.get("machine", {})
    intro = (f"Machine: {m.get('gpu')} x{m.get('gpus')}, {m.get('cpus')} CPUs, torch {m.get('torch')}, CUDA "
             f"{m.get('cuda')}. metric: SST-2 dev accuracy (points) or wikitext2 perplexity. Command: "
             f"`{results.get('command')}`; each figure's details in gpu.json.")
    footer = f"Not run (time budget): {', '.join(results['not_run'])}." if results.get("not_run") else ""
    md = common.markdown("GPU figures (bench/gpu.sh)", intro, (rows(results), COLUMNS), footer=footer)
    common.write_results(path, results, md)


def measure(results: dict, out: Path, args, save) -> None:
    """Every figure in order, each saved when measured; those that would start past the budget are listed."""
    start, checkpoint = time.time(), None
    steps = [("finetune", None), *((f"mrem.{key}", key) for key in SHARES), ("decoder", None)]
    for name, key in steps:
        if time.time() - start > args.budget_s:
            results["not_run"].append(name)
            continue
        if name == "finetune":
            results["finetune"], checkpoint = finetune_figure(out, args)
        elif key is not None:
            results["mrem"][key] = mrem_figure(out, checkpoint, *SHARES[key], args)
        else:
            results["decoder"] = decoder_figure(out, args)
        print(f"[bench gpu] {name} done at {time.time() - start:.0f} s", flush=True)
        save()
    k2, k1 = results["mrem"].get("k2_half_gpu"), results["mrem"].get("k1_whole_gpu")
    if k2 and k1:
        results["mrem"]["train_speedup_k2_vs_k1"] = round(k1["train_s"] / k2["train_s"], 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-examples", type=int, default=4000, help="SST-2 examples fine-tuned (1 epoch)")
    parser.add_argument("--mrem-steps", type=int, default=200, help="MREM steps per module")
    parser.add_argument("--lm-quant", default="w4a8", help="the decoder's QuantConfig")
    parser.add_argument("--budget-s", type=float, default=240.0, help="start no figure after this many seconds")
    parser.add_argument("--out", default=None, help="results file (default bench/results/gpu.json)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU: skipped (nothing recorded)")
        return
    path = Path(args.out).resolve() if args.out else RESULTS
    out = ROOT / "runs" / "gpu_bench" / time.strftime("%Y%m%d-%H%M%S")
    results = {"machine": machine(), "command": " ".join(["python -m bench.gpu", *sys.argv[1:]]),
               "decoder_env": os.environ.get("PLMQ_LM_DECODER"), "runs": str(out.relative_to(ROOT)),
               "finetune": None, "mrem": {}, "decoder": None, "not_run": [], "complete": False}
    start = time.time()

    def save() -> None:
        results["bench_wall_s"] = round(time.time() - start, 1)
        write(results, path)

    measure(results, out, args, save)
    results["complete"] = True
    save()
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=1, default=str))


if __name__ == "__main__":
    main()
