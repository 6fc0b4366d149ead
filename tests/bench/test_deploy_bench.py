"""bench/deploy.py: the figures the issue asks for, from the measured rows (no model is run here)."""
from __future__ import annotations

from types import SimpleNamespace

from bench import deploy


def _row(model, runtime, accuracy, latency_ms, export_s=None):
    return {"model": model, "runtime": runtime, "accuracy": accuracy, "latency_ms": latency_ms, "bytes": 1,
            "export_s": export_s}


def test_speedups_and_the_largest_accuracy_gap_come_from_the_rows():
    rows = [_row("fp", "torch-fp32", 83.4, 400.0), _row("fp", "ort-fp32", 83.4, 300.0),
            _row("rtn-w8a8", "plmq-fakequant", 83.0, 430.0), _row("rtn-w8a8", "ort-int8", 83.0, 150.0, 9.0),
            _row("rtn-w8a8", "openvino-int8", 82.5, 120.0, 9.0),  # not plmq's runtime: not in the gap
            _row("rtn-w8a8", "transformers-ct", 83.2, 500.0, 4.0)]
    out = deploy.summarize(rows, 36, 36, [1.0, 1.0, 1.0], 12.3, SimpleNamespace(run=["runs/demo"]))
    assert out["speedup_ort_int8_vs_torch_fp32"] == 2.67 and out["speedup_ort_int8_vs_ort_fp32"] == 2.0
    assert out["accuracy_delta_vs_plmq"] == 0.2 and out["export_s_max"] == 9.0
    assert out["int_matmuls"] == out["quantized_linears"] == 36 and out["compressed_tensors_identical"]
    assert out["command"] == "python -m bench.deploy --run runs/demo"
    page = deploy.markdown(out)
    assert "2.67x torch FP32" in page and "| rtn-w8a8 | ort-int8 | 83 | 150 | 1 | 9 |" in page
