"""MREM's calibration data: the FP teacher's activations at every module boundary.

`record` runs the teacher, one module at a time, over calibration samples and writes the activations as shards of
`shard_size` rows, one Arrow tensor file per array (memory-mapped, zero-copy to read), with
a `meta.json` that says what the folder holds; the folder is written atomically. `load_into_store`
puts the shards of such a folder into the Ray object store, where the module trainers read them.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pipelines import lm_eval, part_loader
from pipelines.config import DataConfig
from pipelines.data import load_tokenized, tokenized_split
from pipelines.io import atomic_dir, write_json_atomic
from pipelines.partition import Layout, PartSpec, part_forward, split_layers
from pipelines.tasks import check_task

META = "meta.json"


@dataclass
class ActivationCache:
    """ObjectRefs of calibration shards: boundaries[0] holds the token inputs (ids, masks),
    boundaries[k] the hidden states entering module k; row i lies in shard i // shard_size."""
    num_samples: int
    seq_len: int
    shard_size: int
    specs: list[PartSpec]
    layout: Layout
    boundaries: list[list] = field(default_factory=list)
    nbytes: int = 0


def write_shard(folder: Path, shard: dict[str, np.ndarray]) -> None:
    """A shard as one Arrow tensor file per array."""
    folder.mkdir(parents=True, exist_ok=True)
    for key, arr in shard.items():
        with pa.OSFile(str(folder / f"{key}.arrow"), "wb") as sink:
            pa.ipc.write_tensor(pa.Tensor.from_numpy(np.ascontiguousarray(arr)), sink)


def read_shard(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for path in sorted(folder.glob("*.arrow")):
        with pa.memory_map(str(path)) as source:
            out[path.stem] = pa.ipc.read_tensor(source).to_numpy()
    return out


class _ShardWriter:
    """Fills one shard per boundary and writes it when full."""

    def __init__(self, shard_size: int, folder: Path):
        self.shard_size, self.folder = shard_size, folder
        self.pending: dict[int, list[dict]] = {}
        self.counts: dict[int, int] = {}
        self.nbytes = 0

    def add(self, boundary: int, arrays: dict[str, np.ndarray], final: bool = False) -> None:
        """Readers index row i as shard i // shard_size, so every shard but the last holds exactly
        shard_size rows, whatever the calibration batch size."""
        rows = self.pending.setdefault(boundary, [])
        if arrays:
            rows.append(arrays)
        if not rows:
            return
        merged = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
        count = len(next(iter(merged.values())))
        full = count // self.shard_size * self.shard_size
        for start in range(0, full, self.shard_size):
            self._emit(boundary, {k: v[start:start + self.shard_size] for k, v in merged.items()})
        rest = {k: v[full:] for k, v in merged.items()}
        self.pending[boundary] = [rest] if count > full else []
        if final and count > full:
            self._emit(boundary, rest)
            self.pending[boundary] = []

    def _emit(self, boundary: int, shard: dict[str, np.ndarray]) -> None:
        self.nbytes += sum(a.nbytes for a in shard.values())
        index = self.counts.get(boundary, 0)
        write_shard(self.folder / f"b{boundary}" / f"s{index:05d}", shard)
        self.counts[boundary] = index + 1


def _calib_dataset(task: str, tokenizer, data: DataConfig, n: int, seed: int):
    cfg = dataclasses.replace(data, train_examples=n)
    ds = load_tokenized(tokenized_split(task, "train", tokenizer, cfg, seed=seed))
    return ds, max(len(x) for x in ds["input_ids"])


def token_rows(task: str, tokenizer: PreTrainedTokenizerBase, data: DataConfig, n: int,
               seed: int = 0) -> dict[str, np.ndarray]:
    """The calibration inputs as arrays [n, L]: `n` shuffled training examples of a GLUE task padded to
    the longest, or `n` random windows of data.max_length tokens of an LM task's calibration text."""
    if check_task(task).kind == "lm":
        ids = lm_eval.calibration_windows(task, tokenizer, data, n, seed).numpy()
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    ds, seq_len = _calib_dataset(task, tokenizer, data, n, seed)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in ds.column_names]
    feats = [{k: ds[i][k] for k in keys} for i in range(len(ds))]
    return dict(tokenizer.pad(feats, padding="max_length", max_length=seq_len, return_tensors="np"))


def _rows(folder: Path, shard_size: int, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the hidden states written under `folder` (one boundary's shards)."""
    first, last = start // shard_size, (stop - 1) // shard_size
    parts = [read_shard(folder / f"s{i:05d}")["hidden"] for i in range(first, last + 1)]
    merged = np.concatenate(parts) if len(parts) > 1 else parts[0]
    offset = first * shard_size
    return np.ascontiguousarray(merged[start - offset:stop - offset])


@torch.no_grad()
def record(checkpoint: str | Path, task: str, data: DataConfig, k: int, n: int, folder: str | Path,
           batch_size: int = 64, shard_size: int = 512, seed: int = 0, device: str = "cpu") -> dict:
    """Run the FP checkpoint's first K-1 modules over `n` calibration samples of `task`, one module in
    memory at a time (pipelines.part_loader), each fed the boundary its predecessor wrote; write the
    boundary activations into `folder` (atomically). Returns the folder's metadata."""
    lay = part_loader.probe_layout(checkpoint)
    specs = split_layers(lay.count, k, lay.tail)
    tokens = token_rows(task, AutoTokenizer.from_pretrained(str(checkpoint)), data, n, seed)
    rows, seq_len = tokens["input_ids"].shape
    with atomic_dir(folder) as tmp:
        writer = _ShardWriter(shard_size, tmp)
        writer.add(0, tokens, final=True)
        for spec in specs[:-1]:
            part = part_loader.load_part(checkpoint, spec, lay).to(device)
            for start in tqdm(range(0, rows, batch_size), desc=f"calibrate {task} module {spec.index}", unit="batch"):
                stop = min(start + batch_size, rows)
                batch = {key: torch.from_numpy(v[start:stop]).to(device) for key, v in tokens.items()}
                hidden = None if spec.first else torch.from_numpy(_rows(tmp / f"b{spec.index}", shard_size,
                                                                         start, stop)).to(device)
                x, _ = part_forward(part, spec, batch["input_ids"], batch["attention_mask"],
                                    batch.get("token_type_ids"), hidden)
                writer.add(spec.index + 1, {"hidden": x.float().cpu().numpy()})
            writer.add(spec.index + 1, {}, final=True)
            del part
        meta = {"task": task, "num_samples": rows, "seq_len": seq_len, "shard_size": shard_size,
                "boundaries": len(specs), "layers": [[s.start, s.end] for s in specs], "nbytes": writer.nbytes,
                "layout": part_loader.layout_to_json(lay)}
        write_json_atomic(tmp / META, meta)
    return meta


def read_meta(folder: str | Path) -> dict | None:
    """The metadata of a complete calibration folder, else None."""
    path = Path(folder) / META
    return json.loads(path.read_text()) if path.is_file() else None


def specs_of(meta: dict) -> list[PartSpec]:
    """The module split a calibration folder was recorded for."""
    return [PartSpec(k, start, end, len(meta["layers"])) for k, (start, end) in enumerate(meta["layers"])]


def load_into_store(folder: str | Path) -> ActivationCache:
    """The shards of a calibration folder, put into the Ray object store one by one."""
    folder = Path(folder)
    meta = read_meta(folder)
    if meta is None:
        raise FileNotFoundError(f"{folder} holds no calibration shards ({META} missing): run the calibrate stage")
    specs, boundaries, nbytes = specs_of(meta), [], 0
    for b in range(len(specs)):
        refs = []
        for shard_dir in sorted((folder / f"b{b}").iterdir()):
            shard = read_shard(shard_dir)
            nbytes += sum(a.nbytes for a in shard.values())
            refs.append(ray.put(shard))
            del shard
        boundaries.append(refs)
    return ActivationCache(meta["num_samples"], meta["seq_len"], meta["shard_size"], specs,
                           part_loader.layout_from_json(meta["layout"]), boundaries, nbytes)
