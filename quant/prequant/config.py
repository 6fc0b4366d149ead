"""PreQuant's settings: which weight quantizer, which columns stay FP, how many."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import QuantConfig

# The weight quantizers PreQuant compares, as overrides of the QuantConfig's weight spec;
# "config" keeps the spec the QuantConfig string gives (e.g. w4g128). The group quantizers take
# the group size of a grouped QuantConfig string (w4g32: groups of 32), else 128.
WEIGHT_QUANTIZERS: dict[str, dict] = {
    "row": {"granularity": "channel", "axis": 0, "init": "minmax"},      # per-row (per output channel) min-max
    "row-mse": {"granularity": "channel", "axis": 0, "init": "mse"},     # per-row MSE clipping
    # per group of 128 input weights in a row, MSE clipping (+16 bits of scale per 128 weights)
    "group-mse": {"granularity": "group", "group_size": 128, "init": "mse"},
    # the same with a zero point per group: all 2^b levels (W3: 8 instead of 7) (+16 bits of zero point per 128)
    "group-mse-asym": {"granularity": "group", "group_size": 128, "init": "mse", "symmetric": False},
    "minmax": {"granularity": "tensor", "init": "minmax"},               # per-tensor min-max
    "mse": {"granularity": "tensor", "init": "mse"},                     # per-tensor MSE clipping
    "config": {},
}


def with_quantizer(quant: QuantConfig | str, quantizer: str) -> QuantConfig:
    """`quant` with its weight spec set to one of WEIGHT_QUANTIZERS (a group quantizer keeps the
    group size `quant` gives: w4g32 with group-mse has groups of 32)."""
    if quantizer not in WEIGHT_QUANTIZERS:
        raise ValueError(f"quantizer={quantizer!r} is not one of {sorted(WEIGHT_QUANTIZERS)}")
    cfg = QuantConfig.parse(quant)
    if cfg.weight is None:
        raise ValueError(f"{cfg}: PreQuant needs quantized weights (e.g. w4)")
    spec = dict(WEIGHT_QUANTIZERS[quantizer])
    if cfg.weight.granularity == "group" and spec.get("granularity") == "group":
        spec.pop("group_size")
    d = cfg.to_dict()
    d["weight"].update(spec)
    return QuantConfig.from_dict(d)


@dataclass
class OutlierConfig:
    """How `prequantize` converts a model.

    criterion None: no outlier columns at all (the plain low-bit base of the LoRA/BitFit
    baselines). budget: fraction of the model's parameters that may be trained;
    reserved: parameters trained besides the outlier columns (biases/LayerNorm), taken
    out of the budget. The task head (api.head_names) stays FP and is not counted.
    """
    quant: QuantConfig | str = "w4"
    criterion: str | None = "weight"
    budget: float = 0.005
    reserved: int = 0
    seed: int = 0
    skip: list[str] = field(default_factory=list)  # fnmatch patterns of Linears kept FP
