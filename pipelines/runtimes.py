"""Exported models run in the runtimes people deploy with, behind the interface evaluation uses
(`model(**batch).logits`): ONNX Runtime or OpenVINO for `model.onnx`; transformers loads compressed-tensors."""
from __future__ import annotations

import inspect
import os
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from transformers import PreTrainedModel

RUNTIMES = ("onnxruntime", "openvino")


def example_inputs(model: PreTrainedModel, batch: int = 2, length: int = 16) -> dict[str, torch.Tensor]:
    """Inputs to trace `model` on: token ids, an attention mask and, for models with segment embeddings
    (BERT's pair tasks), token type ids."""
    vocab = int(getattr(model.config, "vocab_size", 100))
    ids = torch.randint(1, max(vocab, 2), (batch, length), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    takes_types = "token_type_ids" in inspect.signature(model.forward).parameters
    if takes_types and getattr(model.config, "type_vocab_size", 0) > 1:
        inputs["token_type_ids"] = torch.zeros_like(ids)
    return inputs


def threads() -> int:
    """Threads a runtime uses: torch's setting (OMP_NUM_THREADS), as the torch models evaluated beside it."""
    return int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))


class OnnxModel(torch.nn.Module):
    """`model.onnx` in ONNX Runtime (CPU) or OpenVINO; takes the inputs the graph names, returns logits."""

    def __init__(self, path: str | Path, runtime: str = "onnxruntime"):
        super().__init__()
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
        self.path, self.runtime = str(path), runtime
        self._run, self.input_names = (_ort if runtime == "onnxruntime" else _openvino)(self.path)

    def forward(self, **inputs: torch.Tensor) -> SimpleNamespace:
        feed = {k: inputs[k].cpu().numpy().astype(np.int64) for k in self.input_names if k in inputs}
        missing = set(self.input_names) - set(feed)
        if missing:
            raise ValueError(f"{self.path} needs inputs {sorted(missing)}")
        return SimpleNamespace(logits=torch.from_numpy(np.asarray(self._run(feed))))


def _ort(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads()
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return (lambda feed: session.run(["logits"], feed)[0]), [i.name for i in session.get_inputs()]


def _openvino(path: str):
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(path), "CPU", {"INFERENCE_NUM_THREADS": threads()})
    request = compiled.create_infer_request()
    names = [i.get_any_name() for i in compiled.inputs]
    return (lambda feed: request.infer(feed)[compiled.output(0)].copy()), names


def integer_matmuls(path: str | Path) -> int:
    """Integer matmuls in ONNX Runtime's optimized graph of `path` (MatMulIntegerToFloat, MatMulInteger,
    QLinearMatMul, MatMulNBits)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        nodes = onnx.load(options.optimized_model_filepath).graph.node
    kinds = ("MatMulIntegerToFloat", "MatMulInteger", "QLinearMatMul", "MatMulNBits")
    return sum(n.op_type in kinds for n in nodes)


def latencies(models: dict, tokenizer, batch: int, tokens: int, runs: int) -> dict[str, float]:
    """Median milliseconds of one forward of each model on `batch` examples of `tokens` tokens, rounds interleaved
    (every model once per round, after a warm-up round), each model given the inputs it takes."""
    ids = torch.full((batch, tokens), tokenizer.unk_token_id or 0, dtype=torch.long)
    full = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    inputs = {}
    for key, model in models.items():
        takes = getattr(model, "input_names", None) or inspect.signature(model.forward).parameters
        inputs[key] = {k: v for k, v in full.items() if k in takes}
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for r in range(runs + 1):
            for key, model in models.items():
                t0 = time.perf_counter()
                model(**inputs[key])
                if r:
                    times[key].append((time.perf_counter() - t0) * 1000)
    return {k: statistics.median(v) for k, v in times.items()}
