"""plmq.quant: pure-PyTorch fake quantization, conversion and packed export.

    from quant import QuantConfig, quantize_model, calibrate, save_quantized, load_quantized
    report = quantize_model(model, "w4a8-e8")
    with calibrate(model):
        for batch in batches:
            model(**batch)
    save_quantized(model, "out/")
"""

from .config import QuantConfig, TensorQuant, act_spec, weight_spec
from .convert import (
    HEADS,
    QuantReport,
    calibrate,
    convert_modules,
    dequantized_state_dict,
    find_targets,
    freeze,
    quant_modules,
    quantize_model,
    quantizers,
)
from .export import load_quantized, model_bytes, read_quant_config, save_quantized
from .modules import QuantEmbedding, QuantLinear, Quantizer, fake_quantize
from .pack import legacy_width, pack, packed_numel, unpack
from .ternary import binary_params, binary_quant, ternary_params, ternary_quant
from .uniform import (
    compute_qparams,
    dequantize,
    fake_quant,
    lsq_grad_scale,
    qparams_from_range,
    qrange,
    quantize_int,
)

__all__ = [
    "HEADS", "QuantConfig", "QuantEmbedding", "QuantLinear", "QuantReport", "Quantizer", "TensorQuant",
    "act_spec", "binary_params", "binary_quant", "calibrate", "compute_qparams", "convert_modules",
    "dequantize", "dequantized_state_dict", "fake_quant", "fake_quantize", "find_targets", "freeze",
    "legacy_width", "load_quantized", "lsq_grad_scale", "model_bytes", "pack", "packed_numel", "qparams_from_range",
    "qrange", "quant_modules", "quantize_int", "quantize_model", "quantizers", "read_quant_config",
    "save_quantized", "ternary_params", "ternary_quant", "unpack", "weight_spec",
]

from .qtrain import QAdamW, QTrainLinear, Recipe, StateQuant, convert_qtrain, make_optimizer  # noqa: E402,F401 (issue #6)
from .outliers import CRITERIA, OutlierConfig, OutlierLinear, mark_trainable, prequantize  # noqa: E402,F401 (issue #5)
