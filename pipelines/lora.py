"""LoRA adapters (peft) on a low-bit base, sized to a parameter budget."""
from __future__ import annotations

import re

import torch
from peft import LoraConfig, inject_adapter_in_model

from quant.prequant import allocate


def lora_ranks(modules: dict[str, dict], body_params: int, budget_pct: float) -> dict[str, int]:
    """LoRA rank per quantized Linear (`modules`: a prequant manifest's, each with its [out, in] "shape")
    so that the adapters hold `budget_pct` % of `body_params`."""
    shapes = {n: info["shape"] for n, info in modules.items()}
    target = int(budget_pct / 100 * body_params)
    return allocate({n: o + i for n, (o, i) in shapes.items()}, {n: min(o, i) for n, (o, i) in shapes.items()},
                       target)


def apply_lora(model: torch.nn.Module, ranks: dict[str, int], scaling: float) -> None:
    """peft LoRA adapters (alpha = scaling * r) on the named layers, injected in place."""
    ranks = {n: r for n, r in ranks.items() if r > 0}
    base = max(set(ranks.values()), key=list(ranks.values()).count)
    cfg = LoraConfig(r=base, lora_alpha=scaling * base, target_modules=list(ranks), lora_dropout=0.0,
                     rank_pattern={re.escape(n): r for n, r in ranks.items()},
                     alpha_pattern={re.escape(n): scaling * r for n, r in ranks.items()})
    inject_adapter_in_model(cfg, model)
