"""The output folder of a run: checked before any work, and written by one run at a time.

`check_output_dir` fails with a ConfigError naming `output_dir` when the folder, or a folder above it, is
a file, or when it cannot be written: before Ray starts or any stage runs, not when the first stage saves
its result.

`locked` holds `<folder>/.plmq.lock` for a run: a JSON file {pid, host, started_at, command} created with
O_CREAT | O_EXCL, so of two runs on one folder exactly one creates it and the other refuses before any work,
naming the holder. A lock whose holder is gone (same host, and its PID is not alive or was started after
the lock) is taken over with a warning; a holder on another host is never presumed gone. For a
`pyarrow.fs` URI (s3://) the lock is that of the local working copy: it keeps apart two runs on this
machine, not runs on two machines (object stores offer no atomic create-if-absent).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from pipelines.errors import ConfigError

LOCK_FILE = ".plmq.lock"


def check_output_dir(output_dir: str, folder: Path) -> None:
    """Before any work: `folder` (the local folder of `output_dir`) is a folder this process can write in,
    or can be made as one."""
    what = f"output_dir {output_dir}" if "://" not in output_dir else \
        f"the local working copy of output_dir {output_dir} ({folder}; set PLMQ_CACHE to move it)"
    fix = "set output_dir (--output-dir DIR or --set output_dir=DIR) to a folder you can write"
    folder = Path(folder).absolute()
    try:
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        is_dir = existing.is_dir()
    except OSError as err:  # a folder above it that cannot be searched
        raise ConfigError(f"{what} cannot be reached ({err}): {fix}") from err
    if not is_dir:
        where = "is a file" if existing == folder else f"lies under {existing}, which is a file"
        raise ConfigError(f"{what} {where}, not a folder: {fix}")
    probe = existing / f".plmq-probe.{os.getpid()}.{secrets.token_hex(4)}"
    try:  # a real file meets what mode bits alone do not say: ACLs, read-only mounts, root squash
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as err:
        problem = "is not writable" if existing == folder else f"cannot be created: {existing} is not writable"
        raise ConfigError(f"{what} {problem} ({err.strerror}): {fix}") from err


@contextlib.contextmanager
def locked(folder: Path, output_dir: str, command: str) -> Iterator[Path]:
    """Hold the lock of `folder` (made if missing) while the block runs; yields the lock file."""
    if "://" in output_dir:
        print(f"[run] note: the lock {Path(folder) / LOCK_FILE} keeps other runs on this machine off {output_dir}; "
              "runs on other machines are not detected")
    path, me = acquire(Path(folder), command)
    try:
        yield path
    finally:
        release(path, me)


def acquire(folder: Path, command: str) -> tuple[Path, dict]:
    """Create the lock file of `folder` for this process; (its path, what it holds). A live holder: ConfigError."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time(), "command": command}
    for _ in range(5):  # the holder left, or a stale lock was removed, between two steps: try again
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            holder = _holder(path)
            if holder is None:
                continue
            if not _gone(holder):
                raise ConfigError(_busy(folder, path, holder)) from None
            print(f"[run] WARNING: taking over the lock {path} of PID {holder['pid']} on {holder['host']} "
                  f"(started {_when(holder)}), which is no longer running")
            _remove_if_unchanged(path, holder)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))  # one small write: a reader sees all of it or (briefly) nothing
        return path, me
    raise ConfigError(f"could not take the lock {path}: other runs keep taking it; run again")


def release(path: Path, me: dict) -> None:
    """Remove the lock file when it is still this process's."""
    holder = _holder(path, tries=1)
    if holder and (holder.get("pid"), holder.get("started_at")) == (me["pid"], me["started_at"]):
        path.unlink(missing_ok=True)
    elif holder is not None:
        print(f"[run] WARNING: the lock {path} is no longer this run's (PID {holder.get('pid')} on "
              f"{holder.get('host')} holds it); leaving it")


def _holder(path: Path, tries: int = 10) -> dict | None:
    """What the lock file holds; None when it is gone. A file that stays unreadable (a holder killed between
    creating and writing it) is reported with an unknown holder."""
    for attempt in range(tries):
        try:
            holder = json.loads(path.read_text())
            if isinstance(holder, dict):
                return holder
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            pass
        if attempt + 1 < tries:
            time.sleep(0.1)  # its holder may be writing it this instant
    return {"pid": None, "host": None, "started_at": None, "command": None}


def _gone(holder: dict) -> bool:
    """Whether the holder has certainly stopped: on this host, and its PID is free or now another process's."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    started = _process_start(pid)
    return started is not None and isinstance(holder.get("started_at"), (int, float)) and \
        started > holder["started_at"] + 1


def _process_start(pid: int) -> float | None:
    """When process `pid` started (Unix time), from /proc on Linux; None elsewhere."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _remove_if_unchanged(path: Path, holder: dict) -> None:
    """Remove a stale lock unless another run replaced it since it was read."""
    if _holder(path, tries=1) == holder:
        path.unlink(missing_ok=True)


def _when(holder: dict) -> str:
    at = holder.get("started_at")
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if isinstance(at, (int, float)) else "?"


def _busy(folder: Path, path: Path, holder: dict) -> str:
    if holder.get("pid") is None:
        return (f"output_dir {folder} is locked by {path}, which names no holder (a run killed as it started?): "
                f"if no plmq run is writing to {folder}, remove {path} and run again")
    return (f"output_dir {folder} is in use by another plmq run: PID {holder['pid']} on {holder['host']}, "
            f"started {_when(holder)} ({holder.get('command')}). Wait for it to finish, or, if that process is "
            f"gone, remove {path} and run again (or give this run another --output-dir)")
