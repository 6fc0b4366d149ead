"""OutlierLinear: a frozen low-bit Linear whose few FP input columns train.

    y = Qa(x with x[..., idx] = 0) @ Wq^T + x[..., idx] @ O^T + b

Wq is the low-bit weight (frozen; its columns idx are zero and, for per-row and per-tensor
grids, left out when the grid is fitted), O = W[:, idx] the FP outlier columns [out, r]
(trainable), Qa the input quantizer of aN configs: the outlier features bypass it in FP
(LLM.int8()-style), so its range comes from the other features.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import QuantConfig
from ..export import to_unsigned, unpack_codes
from ..gptq import gptq_round
from ..modules import Quantizer
from ..pack import pack


def _keeps_row_grid(q: Quantizer) -> bool:
    """Whether the grid is per row or per tensor, so dropping columns leaves its shape alone."""
    s = q.spec
    return s.granularity == "tensor" or (s.granularity == "channel" and s.axis % 2 == 0)


class OutlierLinear(nn.Linear):
    """Linear with a frozen low-bit weight and trainable FP outlier columns.

    `weight` (frozen Parameter) holds the dequantized low-bit values with the outlier
    columns set to 0; `outlier` [out, r] the FP columns at `outlier_idx`. Subclassing
    nn.Linear lets peft put LoRA adapters on it (QLoRA-style baselines).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 config: QuantConfig | str = "w4", num_outliers: int = 0):
        nn.Module.__init__(self)  # skip nn.Linear's random FP weight
        config = QuantConfig.parse(config)
        if config.weight is None:
            raise ValueError(f"{config}: OutlierLinear needs quantized weights (e.g. w4)")
        self.in_features, self.out_features, self.config = in_features, out_features, config
        self.weight = nn.Parameter(torch.zeros(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.outlier = nn.Parameter(torch.zeros(out_features, num_outliers))
        self.register_buffer("outlier_idx", torch.zeros(num_outliers, dtype=torch.long))
        self.weight_q = Quantizer(config.weight, "weight", "weight", dynamic=False)
        self.act_q = Quantizer(config.act, "act", "act") if config.act else None
        if self.act_q is not None:
            self.act_q.reserve((1, in_features))

    @classmethod
    @torch.no_grad()
    def from_linear(cls, weight: Tensor, bias: Tensor | None, config: QuantConfig | str,
                    idx: Tensor, hessian: Tensor | None = None) -> OutlierLinear:
        """Quantize `weight` [out, in] except the columns `idx`, which stay FP. hessian: the
        layer's input X^T X: GPTQ rounding (the FP columns take the rounding error) instead of
        round-to-nearest."""
        out_f, in_f = weight.shape
        idx = torch.as_tensor(idx, dtype=torch.long).sort().values
        m = cls(in_f, out_f, bias is not None, config, len(idx)).to(weight.device)
        w = weight.detach().float()
        rest = w.clone()
        rest[:, idx] = 0.0
        keep = torch.ones(in_f, dtype=torch.bool, device=w.device)
        keep[idx] = False
        # The grid comes from the non-outlier columns only: that is what keeping outliers buys.
        m.weight_q.init_from(w[:, keep] if _keeps_row_grid(m.weight_q) and keep.any() else rest)
        if hessian is not None:  # same grid, GPTQ's rounding; the FP columns absorb its error
            w = gptq_round(w, hessian, m.weight_q, keep_fp=idx)
            rest = w.clone()
            rest[:, idx] = 0.0
        m.outlier_idx.copy_(idx)  # before _set_codes, which zeroes these columns
        m.outlier.copy_(w[:, idx])
        codes, params = m.weight_q.codes(rest)
        m._set_codes(codes, params)
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m

    @torch.no_grad()
    def _set_codes(self, codes: Tensor, params: dict[str, Tensor]) -> None:
        w = self.weight_q.decode(codes, params)
        w[:, self.outlier_idx] = 0.0  # binary codes have no 0: the FP columns replace them
        self.weight.copy_(w)

    @property
    def num_outliers(self) -> int:
        return self.outlier.shape[1]

    def effective_weight(self) -> Tensor:
        """The [out, in] weight the layer computes with (low-bit + FP columns)."""
        return self.weight.index_copy(1, self.outlier_idx, self.outlier)

    def forward(self, x: Tensor) -> Tensor:
        x_out = x.index_select(-1, self.outlier_idx) if self.num_outliers else None
        if self.act_q is not None:
            # LLM.int8()-style split: the outlier features reach only their FP columns, so they
            # skip the low-bit input (zeroed, their weight columns are 0); left in, the largest of
            # them would set the input grid of every other feature.
            x = self.act_q(x.index_fill(-1, self.outlier_idx, 0.0) if self.num_outliers else x)
        y = F.linear(x, self.weight, self.bias)
        if x_out is not None:  # a small FP matmul on the FP outlier features only
            y = y + F.linear(x_out, self.outlier)
        return y

    @torch.no_grad()
    def packed_state(self) -> dict[str, Tensor]:
        """weight.packed (+ step/zero_point/threshold); fails if the frozen weight left its grid."""
        spec = self.weight_q.spec
        codes, params = self.weight_q.codes(self.weight)
        again = self.weight_q.decode(codes, params)
        again[:, self.outlier_idx] = 0.0
        if not torch.equal(again, self.weight):
            raise ValueError("the frozen low-bit weight was modified: it is no longer on its quantization grid")
        out = {"weight.packed": pack(to_unsigned(codes, spec), spec.bits)}
        return out | {f"weight.{k}": v.cpu() for k, v in params.items()}

    @torch.no_grad()
    def load_packed(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of packed_state (outlier_idx must already be loaded)."""
        spec = self.weight_q.spec
        dev = self.weight.device
        params = {k: tensors[f"weight.{k}"].to(dev) for k in ("step", "zero_point", "threshold")
                  if f"weight.{k}" in tensors}
        self.weight_q.set_params(params["step"], params.get("zero_point"), params.get("threshold"))
        codes = unpack_codes(tensors["weight.packed"], spec, self.weight.shape).to(dev)
        self._set_codes(codes, params)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.config}, outliers={self.num_outliers}"
