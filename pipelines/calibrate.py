"""Stage `calibrate`: record the FP teacher's activations at every module boundary.

Activations are cut into shards of `shard_size` samples; each shard is a dict of
numpy arrays put into the Ray object store (actors read them zero-copy), and
only the ObjectRefs are kept. The driver holds at most the shards it is filling.
With a cache dir the shards are also written as Arrow tensor files and reused.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch
from tqdm import tqdm

from pipelines import models
from pipelines.config import DataConfig
from pipelines.data import load_tokenized, tokenized_split
from pipelines.partition import PartSpec, part_forward


@dataclass
class ActivationCache:
    """ObjectRefs of calibration shards: boundaries[0] holds the token inputs (ids, masks),
    boundaries[k] the hidden states entering module k."""
    num_samples: int
    seq_len: int
    shard_size: int
    boundaries: list[list] = field(default_factory=list)
    nbytes: int = 0
    from_disk: bool = False
    wall_s: float = 0.0


def cache_key(checkpoint: Path, task: str, data: DataConfig, n: int, specs: list[PartSpec], seed: int) -> str:
    ident = [models.checkpoint_identity(checkpoint), task,
             data.source, str(data.dir), str(data.max_length), str(n), str(seed),
             ",".join(f"{s.start}-{s.end}" for s in specs)]
    return hashlib.sha256("|".join(ident).encode()).hexdigest()[:16]


def write_shard(folder: Path, shard: dict[str, np.ndarray]) -> None:
    """A shard as one Arrow tensor file per array (memory-mapped, zero-copy to read)."""
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


def _calib_dataset(task: str, tokenizer, data: DataConfig, n: int, seed: int):
    cfg = dataclasses.replace(data, train_examples=n)
    ds = load_tokenized(tokenized_split(task, "train", tokenizer, cfg, seed=seed))
    seq_len = max(len(x) for x in ds["input_ids"])
    return ds, seq_len


class _ShardWriter:
    """Fills one shard per boundary, puts it in the object store when full."""

    def __init__(self, shard_size: int, disk: Path | None):
        self.shard_size, self.disk = shard_size, disk
        self.pending: dict[int, list[dict]] = {}
        self.refs: dict[int, list] = {}
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
        shard = {k: np.ascontiguousarray(v) for k, v in shard.items()}
        self.nbytes += sum(a.nbytes for a in shard.values())
        if self.disk is not None:
            write_shard(self.disk / f"b{boundary}" / f"s{len(self.refs.get(boundary, [])):05d}", shard)
        self.refs.setdefault(boundary, []).append(ray.put(shard))


@torch.no_grad()
def record(checkpoint: str | Path, task: str, data: DataConfig, specs: list[PartSpec], n: int,
           batch_size: int = 64, shard_size: int = 512, seed: int = 0, disk: Path | None = None,
           device: str = "cpu") -> ActivationCache:
    """Run the teacher over `n` training samples and shard the boundary activations."""
    model, tokenizer, _ = models.load_checkpoint(checkpoint)
    model.eval().to(device)
    ds, seq_len = _calib_dataset(task, tokenizer, data, n, seed)
    writer = _ShardWriter(shard_size, disk)
    for start in tqdm(range(0, len(ds), batch_size), desc=f"calibrate {task}", unit="batch"):
        feats = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
        feats = [{k: f[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in f} for f in feats]
        batch = tokenizer.pad(feats, padding="max_length", max_length=seq_len, return_tensors="pt")
        writer.add(0, {k: v.numpy() for k, v in batch.items()})
        x, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        tt = batch.get("token_type_ids")
        for spec in specs[:-1]:
            x, _ = part_forward(model, spec, x, mask, tt.to(device) if tt is not None and spec.first else None)
            writer.add(spec.index + 1, {"hidden": x.float().cpu().numpy()})
    for b in range(len(specs)):
        writer.add(b, {}, final=True)
    return ActivationCache(len(ds), seq_len, shard_size, [writer.refs[b] for b in range(len(specs))],
                           writer.nbytes)


def load_from_disk(folder: Path) -> ActivationCache:
    meta = json.loads((folder / "meta.json").read_text())
    boundaries, nbytes = [], 0
    for b in range(meta["boundaries"]):
        refs = []
        for shard_dir in sorted((folder / f"b{b}").iterdir()):
            shard = read_shard(shard_dir)
            nbytes += sum(a.nbytes for a in shard.values())
            refs.append(ray.put(shard))
            del shard
        boundaries.append(refs)
    return ActivationCache(meta["num_samples"], meta["seq_len"], meta["shard_size"], boundaries, nbytes,
                           from_disk=True)


def calibrate(checkpoint: str | Path, task: str, data: DataConfig, specs: list[PartSpec], n: int,
              batch_size: int = 64, shard_size: int = 512, seed: int = 0, cache_dir: str | None = None,
              device: str = "cpu") -> ActivationCache:
    """Teacher activations for MREM, from the disk cache when one matches."""
    start = time.time()
    folder = None
    if cache_dir:
        folder = Path(cache_dir) / f"{task}-{cache_key(Path(checkpoint), task, data, n, specs, seed)}"
        if (folder / "meta.json").exists():
            cache = load_from_disk(folder)
            cache.wall_s = time.time() - start
            print(f"[calibrate {task}] reused {folder} ({cache.nbytes / 2**20:.1f} MiB)")
            return cache
    tmp = folder.with_name(folder.name + ".tmp") if folder else None
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    cache = record(checkpoint, task, data, specs, n, batch_size, shard_size, seed, tmp, device)
    if tmp:
        meta = {"num_samples": cache.num_samples, "seq_len": cache.seq_len, "shard_size": shard_size,
                "boundaries": len(cache.boundaries), "nbytes": cache.nbytes}
        (tmp / "meta.json").write_text(json.dumps(meta))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)  # atomic: a half-written cache never has meta.json in place
    cache.wall_s = time.time() - start
    print(f"[calibrate {task}] {cache.num_samples} samples x {cache.seq_len} tokens, "
          f"{len(cache.boundaries)} boundaries, {cache.nbytes / 2**20:.1f} MiB")
    return cache
