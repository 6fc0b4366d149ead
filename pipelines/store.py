"""Stage records: which stages of a run directory are complete, keyed by their inputs.

A stage's key hashes its config fragment and its upstream stages' keys, so a
re-run with the same inputs finds the record and skips the stage, and any change
upstream changes every key below it. The run directory is a local path or any
`pyarrow.fs` URI (s3://, gs://, file://); stages write their outputs to a local
working folder, and for a remote run directory the folder is uploaded next to
the record. A record is written last and atomically, so a stage that died half
way is never taken as complete; it carries a checksum of its content, so a record
that was truncated, edited or written without one is not trusted either: its
stage is recomputed, with a warning naming the file.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipelines.io import atomic_dir, write_json_atomic

RECORDS = "stages"
CHECKSUM = "checksum"


def stage_key(kind: str, fragment: Any, upstream: list[str]) -> str:
    """Hash of what determines a stage's result: its config fragment and its inputs' keys."""
    ident = json.dumps({"kind": kind, "config": fragment, "upstream": sorted(upstream)}, sort_keys=True, default=str)
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def is_uri(location: str) -> bool:
    return "://" in location


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(rec: dict) -> dict:
    """`rec` as JSON holds it (values made JSON-able, keys strings) with the checksum of that content."""
    body = json.loads(json.dumps(rec, default=str))
    return {**body, CHECKSUM: _digest(body)}


def unseal(raw: bytes) -> tuple[dict | None, str]:
    """(the record without its checksum, "") when `raw` is a whole record whose checksum matches its content,
    else (None, what is wrong with it)."""
    try:
        rec = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"is not a whole JSON record (truncated or damaged: {err})"
    if not isinstance(rec, dict):
        return None, "is not a JSON object"
    if CHECKSUM not in rec:
        return None, "has no checksum (written by an older plmq, or by hand)"
    body = {k: v for k, v in rec.items() if k != CHECKSUM}
    if rec[CHECKSUM] != _digest(body):
        return None, "does not match its checksum (edited or damaged)"
    return body, ""


class StageStore:
    """Records (and, for a remote run directory, outputs) of completed stages."""

    def __init__(self, run_dir: str, local_root: str | Path):
        self.run_dir = run_dir.rstrip("/")
        self.local_root = Path(local_root).resolve()
        self.remote = is_uri(run_dir)
        if self.remote:
            self.fs, self.base = pafs.FileSystem.from_uri(self.run_dir)
        else:
            self.fs, self.base = pafs.LocalFileSystem(), str(Path(run_dir).resolve())

    def _record_path(self, name: str) -> str:
        return f"{self.base}/{RECORDS}/{name.replace('/', '__')}.json"

    def record(self, name: str) -> dict | None:
        """The record `commit` wrote for `name`; None when there is none or it cannot be trusted (truncated,
        edited, without a checksum): then the stage is recomputed, and a warning names the file."""
        path = self._record_path(name)
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            rec, problem = unseal(f.read())
        if problem:
            print(f"[store] WARNING: the record {path} {problem}; stage {name} will be recomputed")
        return rec

    def done(self, name: str, key: str) -> dict | None:
        """The stored outcome of `name` when it was completed with the same key."""
        rec = self.record(name)
        if rec is None or rec.get("key") != key:
            return None
        if self.remote and rec.get("outputs"):
            self.fetch(rec["outputs"])
        return rec

    def commit(self, name: str, key: str, outcome: dict, outputs: str | None = None) -> dict:
        """Mark `name` complete; `outputs` is its folder relative to the local root. Returns the record (without
        its checksum)."""
        rec = {**outcome, "name": name, "key": key, "outputs": outputs, "finished_at": time.time()}
        if self.remote and outputs:
            dest = f"{self.base}/{outputs}"
            self.fs.create_dir(dest, recursive=True)
            pafs.copy_files(str(self.local_root / outputs), dest, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
        if self.remote:
            tmp = self._record_path(name) + ".tmp"
            self.fs.create_dir(f"{self.base}/{RECORDS}", recursive=True)
            with self.fs.open_output_stream(tmp) as f:
                f.write(json.dumps(seal(rec)).encode())
            self.fs.move(tmp, self._record_path(name))
        else:
            write_json_atomic(self._record_path(name), seal(rec))
        return rec

    def fetch(self, outputs: str) -> Path:
        """Download a stage's output folder into the local root unless it is there already."""
        local = self.local_root / outputs
        if not local.exists():
            with atomic_dir(local) as tmp:
                pafs.copy_files(f"{self.base}/{outputs}", str(tmp), source_filesystem=self.fs,
                                destination_filesystem=pafs.LocalFileSystem())
        return local

    def forget(self, name: str) -> None:
        path = self._record_path(name)
        if self.fs.get_file_info(path).type == pafs.FileType.File:
            self.fs.delete_file(path)
