"""GPTQ as a post-training method of its own (stage `gptq`): a whole model quantized block by block.

`gptq_quantize(model, qcfg, batches)` converts the model with `quant.quantize_model` (the same layers as RTN:
heads stay FP unless include_head, embeddings by the QuantConfig), fixes every weight grid at its FP weight
(`quant.freeze`: the grid RTN rounds onto), then walks the stack of blocks in order (`partition.layout`), as
GPTQ does: block i runs on the outputs of the already quantized blocks before it.

Inside a block the quantized Linears are taken in the order the forward reaches them, in groups of Linears
that read one input tensor (q/k/v, GPT-2's c_attn, gate/up), so every group's input comes from layers that
are already final. Per group, one pass over the calibration batches collects H = sum X^T X over the real
tokens (attention_mask) of that input, shared by the group; `quant.gptq.gptq_round` then rounds each weight
onto its fixed grid, so the fake-quant of the new weight is the weight itself and the packed export holds
exactly these codes. The Linears before the first block (e.g. an embedding projection) join block 0's
passes, those after the last (pooler, pre-classifier, a head with include_head) the last block's.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pipelines.partition import PartSpec, layout, part_forward
from quant import QuantConfig, QuantLinear, calibrate, freeze, quantize_model
from quant.gptq import gptq_round


@dataclass
class GptqReport:
    converted: list[str] = field(default_factory=list)   # every quantized layer (quantize_model)
    rounded: list[str] = field(default_factory=list)     # Linears rounded by GPTQ, in order
    unreached: list[str] = field(default_factory=list)   # quantized Linears no calibration forward ran: nearest
    groups: int = 0                                      # groups of Linears that read one input
    tokens: int = 0                                      # real (unpadded) calibration tokens


class _Enough(Exception):
    """Stops a calibration forward once the group it serves has run."""


def _model_inputs(batch: dict) -> tuple[Tensor, Tensor, Tensor | None]:
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    return ids, (torch.ones_like(ids) if mask is None else mask), batch.get("token_type_ids")


def _run(model: nn.Module, spec: PartSpec, batch: dict, hidden: Tensor | None) -> Tensor | None:
    """Blocks [spec.start, spec.end) on `hidden`; None when a hook stopped the forward early."""
    try:
        return part_forward(model, spec, *_model_inputs(batch), hidden)[0]
    except _Enough:
        return None


@contextmanager
def _hooked(*handles) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _pending(model: nn.Module, done: set[str]) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, QuantLinear) and m.weight_q is not None and n not in done}


def _key(x: Tensor) -> tuple:
    return x.data_ptr(), tuple(x.shape), x.stride(), x.dtype


def _groups(model: nn.Module, spec: PartSpec, batch: dict, hidden: Tensor | None,
            done: set[str]) -> list[dict[str, int]]:
    """The not yet rounded Linears this part's forward runs, in groups whose first call reads one input
    tensor, ordered by when the forward first reaches them (one forward on `batch`); per Linear, how many
    times one forward calls it (DeBERTa's query/key projections also read the relative positions)."""
    first: dict[str, tuple] = {}
    calls: dict[str, int] = {}
    inputs: list[Tensor] = []  # held so that no later input can reuse a seen input's memory

    def hook(name):
        def fn(module, args):
            inputs.append(args[0])
            first.setdefault(name, _key(args[0]))
            calls[name] = calls.get(name, 0) + 1
        return fn

    pending = _pending(model, done)
    with _hooked(*[m.register_forward_pre_hook(hook(n)) for n, m in pending.items()]):
        _run(model, spec, batch, hidden)
    groups: dict[tuple, dict[str, int]] = {}
    for name, key in first.items():
        groups.setdefault(key, {})[name] = calls[name]
    return list(groups.values())


def _act_quantizers(layers: Sequence[QuantLinear], role: str) -> nn.ModuleList:
    """The static input (act_q) or output (out_q) quantizers of `layers`: what `quant.calibrate` fixes."""
    return nn.ModuleList([q for m in layers if (q := getattr(m, role)) is not None and not q.dynamic])


def _rows(x: Tensor, mask: Tensor) -> Tensor:
    """A Linear's input as [tokens, features], padding left out when it is laid out per token."""
    if x.shape[:-1] == mask.shape:
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])  # e.g. a pooler's [batch, features]


def _group_passes(model: nn.Module, spec: PartSpec, batches: Sequence[dict], hidden: Sequence[Tensor | None],
                  group: dict[str, int], hooks: Sequence = (), on_batch=None) -> None:
    """The calibration batches through the part, each forward stopped once every Linear of `group` made its
    calls; `hooks`: handles removed afterwards; on_batch(batch) before each forward."""
    left: dict[str, int] = {}

    def count(name):
        def fn(module, args, out):
            left[name] -= 1
            if not any(left.values()):
                raise _Enough
        return fn

    handles = [model.get_submodule(n).register_forward_hook(count(n)) for n in group]
    with _hooked(*hooks, *handles):
        for batch, hid in zip(batches, hidden):
            left.update(group)
            if on_batch is not None:
                on_batch(batch)
            _run(model, spec, batch, hid)


def _hessians(model: nn.Module, spec: PartSpec, batches: Sequence[dict], hidden: Sequence[Tensor | None],
              group: dict[str, int]) -> dict[str, Tensor]:
    """Per Linear of `group`, H = sum X^T X over the real tokens of all its calls on the calibration batches;
    one product per input tensor, shared by the Linears that read it."""
    h: dict[str, Tensor] = {}
    state: dict = {"mask": None, "last": (None, None)}  # last: (input, its X^T X); held, so no other
    # tensor can take its memory while it is compared

    def collect(name):
        def fn(module, args):
            last, xtx = state["last"]
            if last is None or _key(last) != _key(args[0]):
                x = _rows(args[0].detach(), state["mask"]).float()
                last, xtx = args[0], x.T @ x
                state["last"] = (last, xtx)
            h[name] = xtx if name not in h else h[name] + xtx
        return fn

    def new_batch(batch):
        state.update(mask=_model_inputs(batch)[1], last=(None, None))

    hooks = [model.get_submodule(n).register_forward_pre_hook(collect(n)) for n in group]
    _group_passes(model, spec, batches, hidden, group, hooks, new_batch)
    return h


@torch.no_grad()
def _round_group(model: nn.Module, spec: PartSpec, batches: Sequence[dict], hidden: Sequence[Tensor | None],
                 group: dict[str, int], damp: float, block_size: int) -> None:
    """Calibrate the group's input quantizers, collect its Hessians, round its weights, then calibrate its
    output quantizers (-oN) on the rounded layers' outputs."""
    layers = [model.get_submodule(n) for n in group]
    acts = _act_quantizers(layers, "act_q")
    # Input ranges are fixed in the same pass as the Hessians, before this group's weights are rounded: a
    # layer's input depends only on the layers before it, which are final by now, so the ranges are those
    # the exported model sees (the activations before it already quantized; RTN calibrates every range in
    # one pass in which all activations pass unquantized).
    with calibrate(acts):
        h = _hessians(model, spec, batches, hidden, group)
    for name, m in zip(group, layers):
        w = gptq_round(m.linear_weight(), h[name], m.weight_q, damp=damp, block=block_size)
        m.linear_weight().copy_(w)  # Conv1D: a transposed view of the stored [in, out] weight
    outs = _act_quantizers(layers, "out_q")
    if len(outs):
        with calibrate(outs):
            _group_passes(model, spec, batches, hidden, group)
    for q in (*acts, *outs):
        q.enabled = True


@torch.no_grad()
def gptq_quantize(model: nn.Module, qcfg: QuantConfig | str, batches: Sequence[dict], damp: float = 0.01,
                  block_size: int = 128, include_head: bool = False) -> GptqReport:
    """Convert `model` in place and round its Linears by GPTQ, block by block, on the calibration `batches`
    (model inputs: input_ids, attention_mask[, token_type_ids]); activation ranges are calibrated on the way."""
    qcfg = QuantConfig.parse(qcfg)
    if qcfg.weight is None or qcfg.weight.scheme != "uniform":
        raise ValueError(f"{qcfg}: GPTQ rounds weights onto uniform grids (3..8 bits, or w2g<N>)")
    if not batches:
        raise ValueError("GPTQ needs at least one calibration batch")
    model.eval()
    lay = layout(model)  # before converting: its probe forward would initialise uncalibrated ranges
    converted = quantize_model(model, qcfg, include_head=include_head).converted
    freeze(model)  # each weight grid fixed at its FP weight: the grid RTN rounds onto
    statics = [q for m in _pending(model, set()).values() for q in (m.act_q, m.out_q)
               if q is not None and not q.dynamic]
    for q in statics:  # until calibrated, a static range would fit itself to the first tensor it sees
        q.enabled = False
    tokens = sum(int(_model_inputs(b)[1].sum()) for b in batches)
    report, done = GptqReport(converted=converted, tokens=tokens), set()
    hidden: list[Tensor | None] = [None] * len(batches)
    for i in range(lay.count):
        spec = PartSpec(i, i, i + 1, lay.count)
        for group in _groups(model, spec, batches[0], hidden[0], done):
            _round_group(model, spec, batches, hidden, group, damp, block_size)
            report.groups += 1
            report.rounded += list(group)
            done.update(group)
        if i + 1 < lay.count:
            hidden = [_run(model, spec, b, h) for b, h in zip(batches, hidden)]
    report.unreached = sorted(_pending(model, done))
    for q in statics:
        q.enabled = True
    return report
