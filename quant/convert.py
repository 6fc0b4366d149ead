"""Model conversion (quantize_model), calibration, freezing and dequantized export.

Targets: every nn.Linear / HF Conv1D of the model body (BERT: attention query/key/
value/output, intermediate, output, pooler; GPT-2: c_attn, c_proj, c_fc, mlp.c_proj),
and the word embeddings (model.get_input_embeddings()) when config.embedding is set.
Heads (HEADS: classifier, lm_head, ...) stay FP unless include_head=True.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import QuantConfig
from .layers import QuantEmbedding, QuantLinear, is_conv1d
from .modules import Quantizer

HEADS = ("classifier", "lm_head", "cls", "qa_outputs", "score")  # first name component
QuantModule = QuantLinear | QuantEmbedding


@dataclass
class QuantReport:
    """What quantize_model did: converted module names, and the candidate layers kept
    in FP (heads, `skip` matches, word embeddings when config.embedding is None)."""

    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    config: str = ""  # canonical config name

    def __str__(self) -> str:
        s = f"{self.config}: quantized {len(self.converted)} modules, kept {len(self.skipped)} in FP"
        return s + (f" ({', '.join(self.skipped)})" if self.skipped else "")


def _is_head(name: str) -> bool:
    return name.split(".")[0] in HEADS


def _input_embedding_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return next((n for n, m in model.named_modules() if m is emb), None) if emb is not None else None


def find_targets(
    model: nn.Module, config: QuantConfig, skip: list[str] | None = None, include_head: bool = False
) -> tuple[list[str], list[str]]:
    """(names to convert, names of candidate layers kept in FP)."""
    emb_name = _input_embedding_name(model)
    lin_on = any(x is not None for x in (config.weight, config.act, config.output))
    convert, kept = [], []
    for name, m in model.named_modules():
        is_lin = isinstance(m, nn.Linear) or is_conv1d(m)
        is_emb = name == emb_name and isinstance(m, nn.Embedding)
        if not (is_lin or is_emb):
            continue
        wanted = lin_on if is_lin else config.embedding is not None
        if skip and any(fnmatch.fnmatchcase(name, p) for p in skip):
            wanted = False
        if is_lin and _is_head(name) and not include_head:
            wanted = False
        (convert if wanted else kept).append(name)
    return convert, kept


def convert_modules(model: nn.Module, names: list[str], config: QuantConfig | dict[str, QuantConfig]) -> None:
    """Replace the named submodules by quantized wrappers sharing their parameters."""
    for name in names:
        cfg = config[name] if isinstance(config, dict) else config
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_float(getattr(parent, child), cfg))


def quantize_model(
    model: nn.Module, config: QuantConfig | str | dict, skip: list[str] | None = None, include_head: bool = False
) -> QuantReport:
    """Quantize the model in place (fake quantization) and report what changed.

    skip: fnmatch patterns on module names kept in FP. Activation quantizers start
    uncalibrated: run `with calibrate(model): ...` or they init from the first batch.
    """
    config = QuantConfig.parse(config)
    convert, kept = find_targets(model, config, skip, include_head)
    convert_modules(model, convert, config)
    return QuantReport(convert, kept, str(config))


def quant_modules(model: nn.Module) -> Iterator[tuple[str, QuantModule]]:
    """(name, module) for every QuantLinear / QuantEmbedding."""
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            yield name, m


def quantizers(model: nn.Module, kind: str | None = None) -> Iterator[tuple[str, Quantizer]]:
    """(name, quantizer), optionally only kind "weight" or "act"."""
    for name, m in model.named_modules():
        if isinstance(m, Quantizer) and (kind is None or m.kind == kind):
            yield name, m


@contextlib.contextmanager
def calibrate(model: nn.Module, max_samples: int = 2**20) -> Iterator[nn.Module]:
    """Observe activation ranges in the block, fix the steps on exit.

    Inside, static activation quantizers pass tensors through unquantized (weights
    stay quantized) and gradients are off. min-max keeps running extremes; percentile
    and MSE keep a uniform sample of at most max_samples elements per quantizer.
    On exit, Linears that read one tensor (q, k, v) share one input quantizer
    (`share_input_quantizers`).
    """
    qs = [q for _, q in quantizers(model, "act") if not q.dynamic]
    for q in qs:
        q.start_observing(max_samples)
    groups, hooks = _watch_inputs(model)
    try:
        with torch.no_grad():
            yield model
    except BaseException:
        for q in qs:
            q.observing, q._obs = False, None
        raise
    finally:
        for h in hooks:
            h.remove()
    for q in qs:
        q.finish_observing()
    share_input_quantizers(groups)


def _watch_inputs(model: nn.Module) -> tuple[list[list[QuantLinear]], list]:
    """Pre-hooks that group, during the first forward, the QuantLinears with a static input quantizer that run
    one after another on the same tensor (q, k, v; gate, up). Only the last input is held, so nothing big is
    kept and a freed tensor's id cannot join two groups."""
    groups: list[list[QuantLinear]] = []
    state: dict = {"last": None, "seen": set(), "done": False}

    def record(mod: QuantLinear, args: tuple) -> None:
        if state["done"] or not args:
            return
        if id(mod) in state["seen"]:  # a second forward: the structure is known
            state.update(done=True, last=None)
            return
        state["seen"].add(id(mod))
        if args[0] is state["last"]:
            groups[-1].append(mod)
        else:
            groups.append([mod])
        state["last"] = args[0]

    hooks = [m.register_forward_pre_hook(record) for _, m in quant_modules(model)
             if isinstance(m, QuantLinear) and m.act_q is not None and not m.act_q.dynamic]
    return groups, hooks


def share_input_quantizers(groups: list[list[QuantLinear]]) -> int:
    """Each group of Linears that read one tensor gets one input quantizer (the first's, with the largest
    step of the group), so the tensor is quantized once: what integer runtimes (ONNX Runtime's fused
    matmuls, vLLM's fused qkv) need. Returns how many of the group members' steps that changed."""
    changed = 0
    for group in (g for g in groups if len(g) > 1):
        first = group[0].act_q
        steps = [m.act_q.step.detach() for m in group if m.act_q.step is not None]
        if steps and all(s.shape == steps[0].shape for s in steps):
            top = torch.stack(steps).amax(0)
            changed += sum(not torch.equal(s, top) for s in steps)
            with torch.no_grad():
                first.step.copy_(top)
        for m in group[1:]:
            m.act_q = first
    return changed


def tie_input_quantizers(model: nn.Module, forward: Callable[[], object]) -> int:
    """Run `forward` (the model on one batch) to find the Linears that read one tensor, and give each group one
    input quantizer (`share_input_quantizers`); returns how many of the group members' steps that changed."""
    groups, hooks = _watch_inputs(model)
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in hooks:
            h.remove()
    return share_input_quantizers(groups)


def freeze(model: nn.Module) -> None:
    """Fix every weight quantizer's grid at the current weights (no more recomputing)."""
    for _, m in quant_modules(model):
        if m.weight_q is not None:
            m.weight_q.freeze(m.linear_weight())


def dequantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with quantized weights replaced by their dequantized
    values (original layout) and quantizer state dropped: loads into the FP model.

    Caveat: a quantized weight tied to an FP one (GPT-2 wte with an FP lm_head) gets
    one key each, but the FP model re-ties them, so one of the two values is lost."""
    sd = {k: v for k, v in model.state_dict().items() if not _is_quantizer_key(k)}
    with torch.no_grad():
        for name, m in quant_modules(model):
            w = m.quant_weight().detach()
            sd[f"{name}.weight"] = (w.t() if getattr(m, "transposed", False) else w).contiguous().clone()
    return sd


def _is_quantizer_key(key: str) -> bool:
    return any(p in ("weight_q", "act_q", "out_q") for p in key.split(".")[:-1])
