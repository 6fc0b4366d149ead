"""Quantized drop-in layers: QuantLinear (nn.Linear and GPT-2's Conv1D) and QuantEmbedding.

Each shares the wrapped layer's weight Parameter and fake-quantizes it (and, for QuantLinear,
its input and optionally its output) with `Quantizer`s built from a QuantConfig.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import QuantConfig
from .modules import Quantizer


class _CachedWeight:
    """Caches the fake-quant weight when no gradient is needed (inference/eval)."""

    def _quant_weight(self, w: Tensor) -> Tensor:
        q = self.weight_q
        if q is None:
            return w
        stochastic = q.training and q.spec.rounding == "stochastic"
        if torch.is_grad_enabled() or stochastic:
            self._cache = None
            return q(w)
        key = (self.weight._version, self.weight.data_ptr(), self.weight.device, q.state_key())
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, q(w))
        return self._cache[1]


class QuantLinear(_CachedWeight, nn.Module):
    """Linear layer with weight / input / (optional) output fake quantizers.

    `weight` is the wrapped layer's own Parameter (shared, not copied). For GPT-2's
    Conv1D it keeps its [in, out] layout (`transposed=True`) and is quantized as the
    [out, in] Linear weight, so per-channel means per output channel in both cases.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, config: QuantConfig, transposed: bool = False):
        super().__init__()
        self.weight, self.bias, self.transposed, self.config = weight, bias, transposed, config
        self.out_features, self.in_features = self.linear_weight().shape
        self.weight_q = Quantizer(config.weight, "weight", "weight") if config.weight else None
        self.act_q = Quantizer(config.act, "act", "act") if config.act else None
        self.out_q = Quantizer(config.output, "output", "act") if config.output else None
        if self.weight_q is not None:
            self.weight_q.init_from(self.linear_weight())
        if self.act_q is not None:
            self.act_q.reserve((1, self.in_features))
        if self.out_q is not None:
            self.out_q.reserve((1, self.out_features))
        self._cache = None

    @classmethod
    def from_float(cls, module: nn.Module, config: QuantConfig | str) -> QuantLinear | QuantEmbedding:
        """Wrap nn.Linear, HF Conv1D or nn.Embedding, sharing its parameters."""
        config = QuantConfig.parse(config)
        if isinstance(module, nn.Embedding):
            return QuantEmbedding.from_float(module, config)
        if isinstance(module, nn.Linear):
            return cls(module.weight, module.bias, config)
        if is_conv1d(module):
            return cls(module.weight, module.bias, config, transposed=True)
        raise TypeError(f"cannot quantize {type(module).__name__}")

    def linear_weight(self) -> Tensor:
        """The weight in [out, in] layout (a view for Conv1D)."""
        return self.weight.t() if self.transposed else self.weight

    def quant_weight(self) -> Tensor:
        """Fake-quantized weight, [out, in]."""
        return self._quant_weight(self.linear_weight())

    def forward(self, x: Tensor) -> Tensor:
        if self.act_q is not None:
            x = self.act_q(x)
        y = F.linear(x, self.quant_weight(), self.bias)
        return self.out_q(y) if self.out_q is not None else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.config}, transposed={self.transposed}"


class QuantEmbedding(_CachedWeight, nn.Module):
    """Embedding with a fake-quantized table; shares the wrapped layer's weight."""

    def __init__(self, weight: nn.Parameter, config: QuantConfig, padding_idx: int | None = None):
        super().__init__()
        if config.embedding is None:
            raise ValueError("embedding: config.embedding is None (embeddings not quantized)")
        self.weight, self.padding_idx, self.config = weight, padding_idx, config
        self.num_embeddings, self.embedding_dim = weight.shape
        self.weight_q = Quantizer(config.embedding, "embedding", "weight")
        self.weight_q.init_from(weight)
        self._cache = None

    @classmethod
    def from_float(cls, module: nn.Embedding, config: QuantConfig | str) -> QuantEmbedding:
        if module.max_norm is not None:
            raise ValueError("embedding: max_norm is not supported (it rewrites the weights)")
        return cls(module.weight, QuantConfig.parse(config), module.padding_idx)

    @property
    def row_local(self) -> bool:
        """Whether each row is quantized on its own (so rows can be gathered first)."""
        s = self.weight_q.spec
        return s.granularity in ("token", "group") or (s.granularity == "channel" and s.axis % 2 == 0)

    def linear_weight(self) -> Tensor:
        return self.weight

    def quant_weight(self) -> Tensor:
        return self._quant_weight(self.weight)

    def forward(self, ids: Tensor) -> Tensor:
        if torch.is_grad_enabled() and self.row_local and self.weight_q.enabled:
            # Training: quantize only the looked-up rows instead of the whole table.
            rows = F.embedding(ids, self.weight, self.padding_idx)
            return self.weight_q(rows, index=ids)
        return F.embedding(ids, self.quant_weight(), self.padding_idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.config}"


def is_conv1d(module: nn.Module) -> bool:
    """Whether `module` is Hugging Face's Conv1D (GPT-2), a Linear with its weight stored [in, out]."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for plain-torch users
        return False
    return isinstance(module, Conv1D)
