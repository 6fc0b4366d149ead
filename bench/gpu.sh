#!/usr/bin/env bash
# Every GPU path of plmq in one script, sized for one GPU in at most 10 minutes:
#   1. the GPU and the torch/CUDA versions;
#   2. the gpu-marked tests (tests/gpu: Ray Train fine-tune and pretrain on CUDA, MREM-P actors pinned to GPUs
#      and sharing one, RTN's packed export evaluated on CUDA, MREM-P on a causal LM);
#   3. the GPU figures (bench/gpu.py), recorded in bench/results/gpu.json and gpu.md.
# Without a CUDA GPU it says so, records nothing and exits 0.
#
#   bash bench/gpu.sh                                  # from anywhere; runs in the repository root
#   PLMQ_LM_DECODER=<causal-LM folder> bash bench/gpu.sh   # the decoder figure on that model (else tiny-llama)
#   PYTHON=/path/to/python bash bench/gpu.sh           # default: .venv/bin/python, else python3
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
TESTS_TIMEOUT_S=${GPU_TESTS_TIMEOUT_S:-270}   # the tests and the figures together stay under 10 minutes
BENCH_TIMEOUT_S=${GPU_BENCH_TIMEOUT_S:-300}

if ! why=$("$PY" -c 'import torch
raise SystemExit(0 if torch.cuda.is_available() else f"torch {torch.__version__} sees no CUDA device")' 2>&1); then
  echo "no CUDA GPU: skipped ($PY: ${why##*$'\n'}; nothing run, nothing recorded)"
  exit 0
fi

echo "== GPU"
if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "(nvidia-smi not found)"; fi
"$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
                               f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")'

echo "== gpu-marked tests (at most ${TESTS_TIMEOUT_S} s)"
timeout "$TESTS_TIMEOUT_S" "$PY" -m pytest -m gpu tests/gpu -q -p no:cacheprovider

echo "== GPU figures (at most ${BENCH_TIMEOUT_S} s)"
timeout "$BENCH_TIMEOUT_S" "$PY" -m bench.gpu "$@"
echo "== recorded: bench/results/gpu.json, bench/results/gpu.md"
