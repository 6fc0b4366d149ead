"""quant.deploy.onnx: plmq models as ONNX that ONNX Runtime runs with integer kernels and plmq's numbers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from quant import OutlierConfig, calibrate, prequantize, quantize_model
from quant.deploy.onnx import check_onnx, save_onnx, trace

ort = pytest.importorskip("onnxruntime")


def _bert() -> transformers.BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, num_labels=2)
    return transformers.BertForSequenceClassification(cfg).eval()


def _inputs(n: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 100, (n, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, length // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _run(path, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]


@pytest.mark.parametrize("quant", ["w8a8", "w4a8", "w2a8", "w4g16a16", "w8a16"])
def test_onnx_runtime_computes_what_plmq_computes(tmp_path, quant):
    model = _bert()
    quantize_model(model, quant)
    with calibrate(model):
        model(**_inputs(4, 12, 0))
    info = save_onnx(model, _inputs(2, 8, 1), tmp_path / "m.onnx")
    assert info == ({"qdq_linears": 13, "nbits_linears": 0, "shared_steps_changed": 0} if "a8" in quant
                    else {"qdq_linears": 0, "nbits_linears": 13, "shared_steps_changed": 0})
    test = _inputs(3, 20, 2)  # another shape, values beyond the calibrated range
    with torch.no_grad():
        expected = model(**test).logits.numpy()
    np.testing.assert_allclose(_run(tmp_path / "m.onnx", test), expected, atol=1e-6, rtol=0)


def test_tracing_leaves_the_model_in_eval_mode_with_its_outputs(tmp_path):
    model = _bert()
    test = _inputs(2, 8, 1)
    trace(model, test, tmp_path / "fp.onnx")
    assert not model.training  # the exporter restores its wrapper's mode, which must not switch dropout on
    with torch.no_grad():
        expected = model(**test).logits.numpy()
    np.testing.assert_allclose(_run(tmp_path / "fp.onnx", test), expected, atol=1e-6, rtol=0)


def test_prequant_columns_run_beside_matmulnbits(tmp_path):
    model = _bert()
    prequantize(model, OutlierConfig("w4g16a16", budget=0.02))
    save_onnx(model, _inputs(2, 8, 1), tmp_path / "m.onnx")
    test = _inputs(3, 10, 2)
    with torch.no_grad():
        expected = model(**test).logits.numpy()
    np.testing.assert_allclose(_run(tmp_path / "m.onnx", test), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("quant,why", [("w4a8-e8", "quantized embeddings"), ("w1a8", "binary"),
                                       ("w4g16a8", "per-channel"), ("w4a8-o8", "output quantizers")])
def test_what_has_no_integer_kernel_is_refused_before_writing(tmp_path, quant, why):
    model = _bert()
    quantize_model(model, quant)
    with calibrate(model):
        model(**_inputs(2, 8, 0))
    with pytest.raises(ValueError, match=why):
        check_onnx(model)
    with pytest.raises(ValueError, match="w8a8, w4a8, w2a8"):
        save_onnx(model, _inputs(2, 8, 1), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
