"""Load one MREM module of a saved model: only the tensors it runs, read from the safetensors files.

The model is built as a skeleton with its parameters on the meta device (no memory; buffers such
as rotary frequencies are built for real), pruned to the module (pipelines.partition), and then
filled with the tensors the module needs: its blocks, the prefix it runs (without the word
embeddings unless it is the first module) and the head if it is the last. No process holds the
whole model: memory per module actor falls as K grows.

`probe_layout` finds a saved model's Layout the same way, loading the non-block tensors and one block.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn

from pipelines import checkpoints, models
from pipelines.partition import LAYOUT_ATTR, Layout, PartSpec, find_blocks, layout, prune_to_part, tie_groups

INDEX = "model.safetensors.index.json"


def weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (single file or a sharded index)."""
    index = directory / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{directory} holds no safetensors weights (model.safetensors or {INDEX}); "
                                "MREM loads modules from safetensors: re-save the model with "
                                "save_pretrained(..., safe_serialization=True)")
    with safe_open(str(single), "pt") as f:
        return {name: single for name in f.keys()}


def skeleton(directory: Path) -> nn.Module:
    """The saved model's architecture with its head, parameters on the meta device."""
    meta = checkpoints.read_meta(directory)
    if meta["format"] != "fp":
        raise ValueError(f"{directory}: MREM modules load from an FP checkpoint, not {meta['format']!r}")
    with init_empty_weights(include_buffers=False):
        model = models.from_config(models.model_config(directory)).eval()
    model.tie_weights()  # not done on meta parameters at construction
    return model


def fill(model: nn.Module, directory: Path, aliases: dict[str, list[str]] | None = None,
         keep: Callable[[str], bool] | None = None) -> nn.Module:
    """Load every parameter and persistent buffer still on the meta device (whose name `keep` accepts)
    from the safetensors files; `aliases`: tie_groups of the unpruned model."""
    files = weight_files(directory)
    aliases = aliases or tie_groups(model)
    wanted = [n for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]
              if t.device.type == "meta" and (keep is None or keep(n))]
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name in wanted:
        source = next((a for a in aliases.get(name, [name]) if a in files), None)
        if source is None:
            raise KeyError(f"{directory}: tensor {name!r} is in the model but not in its safetensors files")
        by_file.setdefault(files[source], []).append((name, source))
    tensors = {}
    for path, pairs in by_file.items():
        with safe_open(str(path), "pt") as f:
            tensors.update({name: f.get_tensor(source) for name, source in pairs})
    model.load_state_dict(tensors, strict=False, assign=True)
    _retie(model, aliases)
    return model


def _retie(model: nn.Module, aliases: dict[str, list[str]]) -> None:
    """`assign=True` gives each name its own tensor: point the tied names still in the model at one."""
    present = dict(model.named_parameters(remove_duplicate=False))
    for group in {tuple(n for n in g if n in present) for g in aliases.values()}:
        for name in group[1:]:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, present[group[0]])


def load_part(directory: str | Path, spec: PartSpec, lay: Layout) -> nn.Module:
    """Module `spec` of the FP checkpoint in `directory`, pruned (partition.prune_to_part) and loaded
    with only the tensors it runs."""
    directory = Path(directory)
    model = skeleton(directory)
    aliases = tie_groups(model)
    object.__setattr__(model, LAYOUT_ATTR, lay)
    return fill(prune_to_part(model, spec), directory, aliases)


def probe_layout(directory: str | Path) -> Layout:
    """The Layout of a saved model, loading its non-block tensors and its first block only."""
    directory = Path(directory)
    model = skeleton(directory)
    blocks, _ = find_blocks(model)
    fill(model, directory, keep=lambda n: not n.startswith(blocks + ".") or n.startswith(f"{blocks}.0."))
    return layout(model)


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors that are not on the meta device."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if t.device.type != "meta"}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def layout_to_json(lay: Layout) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in lay.__dict__.items()}


def layout_from_json(data: dict) -> Layout:
    return Layout(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

