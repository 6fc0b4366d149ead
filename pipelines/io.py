"""Atomic writes (a reader never sees a half-written file or folder), and the one way a training state is read
back from an output folder (never unpickled)."""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file beside it, renamed over `path` once it is complete and
    on disk. The file gets the mode a plain open() gives (0o666 less the umask), so that with a group- or
    world-readable umask another user can read, and resume, a shared output folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask, as open() does
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # a crash right after the rename must not leave an empty file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yields an empty folder beside `final`; when the block ends without an error it replaces `final`.
    A crash leaves `final` as it was (or absent), never half-written. The folder is made by a plain mkdir,
    so its mode is 0o777 less the umask."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub-style Markdown table of `rows` (missing cells left blank)."""
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


class UnsafeFile(pickle.UnpicklingError):
    """A file in an output folder that holds more than tensors and plain data: it is never unpickled."""


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """A training state written with torch.save: tensors, numbers, strings, lists and dicts only. A file that
    holds other Python objects (a crafted pickle could run code on load) raises UnsafeFile, naming it."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeFile(f"{path}: refusing to load it: it holds Python objects beyond tensors and plain data, "
                         "and plmq never unpickles a file from an output folder (a crafted one could run code). "
                         f"Delete it; the work it saved is redone. ({str(err).splitlines()[0][:200]})") from None
