"""plmq.quant: pure-PyTorch fake quantization, conversion and packed export.

    from quant import QuantConfig, quantize_model, calibrate, save_quantized, load_quantized
    report = quantize_model(model, "w4a8-e8")
    with calibrate(model):
        for batch in batches:
            model(**batch)
    save_quantized(model, "out/")

PreQuant (quant.prequant): `prequantize(model, OutlierConfig("w4"))` quantizes a pre-trained
model keeping a few FP columns per Linear; quantized training (quant.qtrain): `convert_qtrain`.
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
from .layers import QuantEmbedding, QuantLinear
from .modules import Quantizer, fake_quantize
from .pack import pack, packed_numel, unpack
from .prequant import (
    CRITERIA,
    WEIGHT_QUANTIZERS,
    OutlierConfig,
    OutlierLinear,
    load_prequantized,
    mark_trainable,
    prequantize,
    save_prequantized,
    to_skeleton,
    with_quantizer,
)
from .qoptim import QAdamW, StateQuant
from .qtrain import QTrainLinear, Recipe, convert_qtrain, make_optimizer
from .step_tuning import release_codes, tune_steps
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
    "CRITERIA",
    "HEADS",
    "WEIGHT_QUANTIZERS",
    "OutlierConfig",
    "OutlierLinear",
    "QAdamW",
    "QTrainLinear",
    "QuantConfig",
    "QuantEmbedding",
    "QuantLinear",
    "QuantReport",
    "Quantizer",
    "Recipe",
    "StateQuant",
    "TensorQuant",
    "act_spec",
    "binary_params",
    "binary_quant",
    "calibrate",
    "compute_qparams",
    "convert_modules",
    "convert_qtrain",
    "dequantize",
    "dequantized_state_dict",
    "fake_quant",
    "fake_quantize",
    "find_targets",
    "freeze",
    "load_prequantized",
    "load_quantized",
    "lsq_grad_scale",
    "make_optimizer",
    "mark_trainable",
    "model_bytes",
    "pack",
    "packed_numel",
    "prequantize",
    "qparams_from_range",
    "qrange",
    "quant_modules",
    "quantize_int",
    "quantize_model",
    "quantizers",
    "release_codes",
    "read_quant_config",
    "save_prequantized",
    "save_quantized",
    "ternary_params",
    "ternary_quant",
    "tune_steps",
    "to_skeleton",
    "unpack",
    "weight_spec",
    "with_quantizer",
]
