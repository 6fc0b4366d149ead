"""Random access to rows of calibration shards held in the Ray object store."""
from __future__ import annotations

import numpy as np
import ray


class ShardReader:
    """Rows of object-store shards (dicts of numpy arrays, read zero-copy); row i lies in shard
    i // shard_size, as the calibration stage wrote them."""

    def __init__(self, refs: list, shard_size: int):
        self.shards = ray.get(list(refs)) if refs else []
        self.shard_size = shard_size

    def rows(self, idx: np.ndarray, key: str) -> np.ndarray:
        return np.stack([self.shards[i // self.shard_size][key][i % self.shard_size] for i in idx])

    def has(self, key: str) -> bool:
        return bool(self.shards) and key in self.shards[0]
