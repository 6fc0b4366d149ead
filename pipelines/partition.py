"""Split any Hugging Face transformer into K modules of consecutive blocks (MREM), without per-family code.

`layout(model)` finds the model's stack of blocks (the `nn.ModuleList` of `num_hidden_layers`
identical modules) and, with one probe forward, which other parameters run before the blocks
(the prefix: embeddings, position tables) and which after them (the suffix: final norm, pooler, head).
A module is the *same* model object with the other blocks replaced by parameter-free stand-ins;
its state dict keeps the full model's key names, and `part_state` is the share of it the module
owns (its blocks, the prefix in the first module, the suffix in the last), so assembling the
trained modules is a plain `load_state_dict` of their union.

`part_forward` runs blocks [start, end) through the model's own forward: the model builds its
attention masks, rotary position embeddings and cache flags itself, a pre-hook hands the recorded
hidden states to block `start` and a hook stops the forward after block `end - 1`.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

LAYOUT_ATTR = "_plmq_layout"


@dataclass(frozen=True)
class PartSpec:
    index: int
    start: int      # first transformer layer (inclusive)
    end: int        # last transformer layer (exclusive)
    num_parts: int

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.num_parts - 1


@dataclass(frozen=True)
class Layout:
    """Where a model's pieces are: plain data (travels to actors, calibration metadata)."""
    blocks: str                  # dotted path of the ModuleList of blocks, e.g. "model.layers"
    count: int
    hidden_arg: str              # a block's hidden-states parameter (when the model passes it by name)
    returns: int                 # a block returns a tensor (0) or a tuple of this length
    prefix: tuple[str, ...]      # modules with parameters that run before the blocks (or never)
    suffix: tuple[str, ...]      # ... and after them
    tied: tuple[str, ...] = ()   # parameter names shared by two modules (tied embeddings)
    tail: float = 0.0            # what the suffix (final norm, head) costs per token, in blocks: its parameters
                                 # over one block's (a matmul costs its parameters per token; embeddings are lookups)


class UnsupportedModel(ValueError):
    """The model has no stack of blocks MREM can split."""


def split_layers(num_layers: int, k: int, tail: float = 0.0) -> list[PartSpec]:
    """K contiguous layer ranges whose slowest module is as fast as it can be, when each block costs 1 and the
    last module also runs the suffix, costing `tail` blocks (a large vocabulary's head: Layout.tail). Modules
    train at the same time, so the slowest sets MREM-P's time. Uneven splits give the earlier modules one layer
    more."""
    if not 1 <= k <= num_layers:
        raise ValueError(f"mrem.modules={k}: must be between 1 and the model's {num_layers} layers")
    if k == 1:
        return [PartSpec(0, 0, num_layers, 1)]
    # the first k-1 modules share `s` layers evenly; the last takes the rest and the tail (ties: larger s)
    s = min(range(k - 1, num_layers), key=lambda s: (max(-(-s // (k - 1)), num_layers - s + tail), -s))
    base, extra = divmod(s, k - 1)
    bounds = [0]
    for i in range(k - 1):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    bounds.append(num_layers)
    return [PartSpec(i, bounds[i], bounds[i + 1], k) for i in range(k)]


def _config_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "num_hidden_layers", None)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of the model's transformer blocks: `num_hidden_layers` modules of one class
    (outermost: lists nested inside the blocks do not count)."""
    n = _config_layers(model)
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0 and (n is None or len(m) == n)
             and len({type(b) for b in m}) == 1]
    if not found:
        raise UnsupportedModel(
            f"{type(model).__name__}: no stack of transformer blocks found (an nn.ModuleList of "
            f"{n if n is not None else 'num_hidden_layers'} identical blocks, as the model config's "
            "num_hidden_layers says); MREM splits models built on such a list")
    stacks = [(name, m) for name, m in found if not any(name.startswith(other + ".") for other, _ in found)]
    if len(stacks) > 1:
        raise UnsupportedModel(f"{type(model).__name__}: several stacks of blocks ({', '.join(n for n, _ in stacks)}"
                               "), as in encoder-decoder models; MREM splits models with one stack")
    return stacks[0]


class _Stop(Exception):
    def __init__(self, output: torch.Tensor):
        self.output = output


def _first(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class Skipped(nn.Module):
    """Stand-in for a block another module owns: no parameters, the block's plain attributes
    (attention type, layer index), and its input handed on in the block's return structure."""

    def __init__(self, block: nn.Module, returns: int):
        super().__init__()
        for key, value in vars(block).items():
            if not key.startswith("_") and not isinstance(value, (nn.Module, torch.Tensor)):
                setattr(self, key, value)
        self.returns = returns

    def forward(self, hidden, *args, **kwargs):
        return hidden if not self.returns else (hidden,) + (None,) * (self.returns - 1)


class Dropped(nn.Module):
    """Stand-in for a head or norm another module owns (never called: the forward stops before it)."""

    def forward(self, *args, **kwargs):  # pragma: no cover - never called
        raise RuntimeError("this part of the model belongs to another MREM module")


class ZeroEmbedding(nn.Module):
    """The word embeddings of a module that does not start the model: its prefix still runs (masks,
    positions), but block `start` receives recorded hidden states, so the lookup's value is unused."""

    def __init__(self, dim: int, dtype: torch.dtype):
        super().__init__()
        self.dim, self.dtype = dim, dtype

    def forward(self, input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros(*input_ids.shape, self.dim, dtype=self.dtype, device=input_ids.device)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@contextmanager
def _hooks(*handles) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _probe_ids(model: nn.Module) -> torch.Tensor:
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    return torch.full((1, 4), 2 if pad == 1 else 1, dtype=torch.long, device=device)


@torch.no_grad()
def _probe(model: nn.Module, blocks: str, block_list: nn.ModuleList) -> tuple[list[str], list[str], int]:
    """Run the model with its first block only: which parameter modules run before it, which after,
    and what the block returns."""
    order, seen = [], {}
    owners = [(n, m) for n, m in model.named_modules()
              if any(True for _ in m.parameters(recurse=False)) and not n.startswith(blocks + ".")]
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n)) for n, m in owners]
    block0 = block_list[0]
    handles.append(block0.register_forward_pre_hook(lambda mod, args: order.append(None)))
    handles.append(block0.register_forward_hook(lambda mod, args, out: seen.setdefault("out", out)))
    with _hooks(*handles), _swapped(model, blocks, nn.ModuleList([block0])):
        was_training = model.training
        model.eval()
        try:
            model(input_ids=_probe_ids(model), attention_mask=torch.ones(1, 4, dtype=torch.long))
        finally:
            model.train(was_training)
    cut = order.index(None) if None in order else len(order)
    after = set(order[cut + 1:])
    suffix = [n for n, _ in owners if n in after and n not in order[:cut]]
    prefix = [n for n, _ in owners if n not in suffix]
    out = seen.get("out")
    return prefix, suffix, len(out) if isinstance(out, (tuple, list)) else 0


def _hidden_arg(block: nn.Module) -> str:
    params = list(inspect.signature(block.forward).parameters)
    return params[0] if params else "hidden_states"


def tie_groups(model: nn.Module) -> dict[str, list[str]]:
    """Every name of each parameter (tied weights have several; a file stores one of them)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {name: group for group in names.values() for name in group}


def _tied(model: nn.Module) -> tuple[str, ...]:
    return tuple(sorted(n for n, group in tie_groups(model).items() if len(group) > 1))


def layout(model: nn.Module) -> Layout:
    """The model's Layout (computed once and kept on the model object)."""
    cached = getattr(model, LAYOUT_ATTR, None)
    if cached is not None:
        return cached
    blocks, block_list = find_blocks(model)
    prefix, suffix, returns = _probe(model, blocks, block_list)
    lay = Layout(blocks, len(block_list), _hidden_arg(block_list[0]), returns, tuple(prefix), tuple(suffix),
                 _tied(model), _tail(model, suffix, block_list[0]))
    object.__setattr__(model, LAYOUT_ATTR, lay)
    return lay


def _tail(model: nn.Module, suffix: list[str], block: nn.Module) -> float:
    """The suffix's parameters (each tensor once, tied ones included) over one block's."""
    params = {id(p): p for name in suffix for p in model.get_submodule(name).parameters()}
    return round(sum(p.numel() for p in params.values()) / max(sum(p.numel() for p in block.parameters()), 1), 3)


def num_layers(model: nn.Module) -> int:
    return layout(model).count


@contextmanager
def _swapped(model: nn.Module, blocks: str, replacement: nn.ModuleList) -> Iterator[None]:
    original = model.get_submodule(blocks)
    _set(model, blocks, replacement)
    try:
        yield
    finally:
        _set(model, blocks, original)


def prune_to_part(model: nn.Module, spec: PartSpec) -> nn.Module:
    """Keep only the blocks (and prefix/suffix) of `spec`, in place (again on a pruned model: no change);
    returns the model. Parameters the module runs but does not own (a later module's prefix, tied
    embeddings) are frozen."""
    lay = layout(model)
    block_list = model.get_submodule(lay.blocks)
    for i in range(lay.count):
        if not spec.start <= i < spec.end and not isinstance(block_list[i], Skipped):
            block_list[i] = Skipped(block_list[i], lay.returns)
    if not spec.last:
        for name in lay.suffix:
            if not any(name.startswith(outer + ".") for outer in lay.suffix):  # the outermost modules
                _set(model, name, Dropped())
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not spec.first and emb is not None and not isinstance(emb, ZeroEmbedding):
        model.set_input_embeddings(ZeroEmbedding(emb.weight.shape[1], emb.weight.dtype))
    owned = set(part_state(model, spec))
    for name, p in model.named_parameters(remove_duplicate=False):
        if name not in owned or name in lay.tied:
            p.requires_grad_(False)
    return model


def owns(lay: Layout, spec: PartSpec, key: str) -> bool:
    """Whether module `spec` owns state-dict entry `key` of the full model."""
    head = lay.blocks + "."
    if key.startswith(head):
        return spec.start <= int(key[len(head):].split(".")[0]) < spec.end
    if any(key == n or key.startswith(n + ".") for n in lay.suffix):
        return spec.last
    return spec.first


def part_state(model: nn.Module, spec: PartSpec) -> dict[str, torch.Tensor]:
    """The share of the (pruned) model's state dict that module `spec` owns, under full-model names."""
    lay = layout(model)
    return {k: v for k, v in model.state_dict().items() if owns(lay, spec, k)}


def part_forward(model: nn.Module, spec: PartSpec, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 token_type_ids: torch.Tensor | None = None,
                 hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run blocks [spec.start, spec.end) of `model` (whole or pruned) on `hidden` (the states entering
    block spec.start; None for the first module, which starts from the token ids).

    Returns (output, per-block outputs): the hidden states leaving block spec.end - 1, or for the
    last module the model's logits."""
    lay = layout(model)
    if (hidden is None) != (spec.start == 0):
        raise ValueError(f"module {spec.index}: hidden states are {'missing' if hidden is None else 'unexpected'}"
                         f" for blocks [{spec.start}, {spec.end})")
    block_list = model.get_submodule(lay.blocks)
    running = nn.ModuleList([b if isinstance(b, Skipped) or i >= spec.start else Skipped(b, lay.returns)
                             for i, b in enumerate(block_list[:spec.end])])
    outs: list[torch.Tensor] = []

    def feed(mod, args, kwargs):
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        return args, {**kwargs, lay.hidden_arg: hidden}

    def record(mod, args, out):
        outs.append(_first(out))

    def stop(mod, args, out):
        raise _Stop(_first(out))

    handles = [b.register_forward_hook(record) for b in running[spec.start:]]
    if hidden is not None:
        handles.append(running[spec.start].register_forward_pre_hook(feed, with_kwargs=True))
    if spec.end < lay.count or not spec.last:
        handles.append(running[spec.end - 1].register_forward_hook(stop))
    extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
    with _hooks(*handles), _swapped(model, lay.blocks, running):
        try:
            out = model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        except _Stop as stopped:
            return stopped.output, outs
    return out.logits, outs
