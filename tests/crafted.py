"""A crafted pickle: a file that `torch.load` would accept, and whose unpickling creates a marker file."""
from __future__ import annotations

from pathlib import Path

import torch


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)  # what an attacker's payload would run when unpickled


def crafted_pickle(path: Path, **fields) -> Path:
    """Write a training state at `path` with a payload; returns the marker file that must never appear."""
    marker = path.parent / "PAYLOAD_RAN"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 3, **fields, "payload": _Payload(marker)}, path)
    return marker
