"""PreQuant numerics: quantize a *pre-trained* model once, keeping a few input columns per Linear FP.

PreQuant (Gong et al., Findings of ACL 2023) quantizes a pre-trained model once and then
fine-tunes only a tiny set of weights kept in higher precision. Here that set is r whole
input columns per Linear weight, chosen by a scoring criterion (`CRITERIA`; add your own with
`register_criterion`), higher = kept in FP:
  weight      max_i |W[i, j]| / std(W): columns holding the matrix's extreme values
  activation  max |x_j| of the layer's input on unlabelled calibration text; for
              query/key/value/intermediate that input is a LayerNorm output, so these are
              the LayerNorm outlier dimensions of BERT-like models
  random      uniform random scores (ablation)

Modules: config (OutlierConfig, WEIGHT_QUANTIZERS), criteria (column scores, input statistics),
layer (OutlierLinear), api (budget, prequantize, trainable selection), io (save/load).

    report = prequantize(model, OutlierConfig("w4", criterion="weight", budget=0.005))
    mark_trainable(model, outliers=True)            # + the task head; everything else frozen
    save_prequantized(model, "out/")                 # packed codes + FP outlier columns
    to_skeleton(fresh, "out/"); load_prequantized(fresh, "out/")
"""
from .api import (
    OutlierReport,
    allocate,
    body_params,
    head_names,
    is_head,
    is_norm,
    linear_weight,
    mark_trainable,
    outlier_modules,
    plan_outliers,
    prequantize,
    replace_module,
    targets,
    trainable_count,
    trainable_selection,
)
from .config import WEIGHT_QUANTIZERS, OutlierConfig, with_quantizer
from .criteria import CRITERIA, Criterion, activation_absmax, column_scores, input_stats, register_criterion
from .io import FORMAT, MANIFEST_FILE, WEIGHTS_FILE, load_prequantized, read_manifest, save_prequantized, to_skeleton
from .layer import OutlierLinear

__all__ = [
    "CRITERIA", "FORMAT", "MANIFEST_FILE", "WEIGHTS_FILE", "WEIGHT_QUANTIZERS", "Criterion", "OutlierConfig",
    "OutlierLinear", "OutlierReport", "activation_absmax", "allocate", "body_params", "column_scores", "head_names",
    "input_stats", "is_head", "is_norm", "linear_weight", "load_prequantized", "mark_trainable", "outlier_modules",
    "plan_outliers", "prequantize", "read_manifest", "register_criterion", "replace_module", "save_prequantized",
    "targets", "to_skeleton", "trainable_count", "trainable_selection", "with_quantizer",
]
