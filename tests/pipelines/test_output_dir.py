"""The output folder: file modes that follow the umask, one writer at a time, and a folder that can be
written checked before any work."""
from __future__ import annotations

import errno
import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from pipelines import dag, outdir, runner
from pipelines.cli import app
from pipelines.config import load_config
from pipelines.errors import ConfigError
from pipelines.io import atomic_dir, write_json_atomic, write_text_atomic
from pipelines.outdir import LOCK_FILE, acquire, check_output_dir, locked
from pipelines.stages import Stage

ROOT = Path(__file__).resolve().parents[2]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test; the old one comes back afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


# ---------------------------------------------------------------- file modes

@pytest.mark.parametrize("mask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                     (0o002, 0o664, 0o775)])
def test_written_files_and_folders_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    text = write_text_atomic(tmp_path / "report.md", "# report\n")
    record = write_json_atomic(tmp_path / "stages" / "rtn.json", {"key": "k1"})
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "weights.bin").write_bytes(b"\x00")
    assert (mode(text), mode(record)) == (file_mode, file_mode)
    assert (mode(tmp_path / "model"), mode(tmp_path / "stages")) == (dir_mode, dir_mode)
    assert text.read_text() == "# report\n"


def test_an_overwrite_takes_the_umask_mode_and_leaves_no_temporary_file(tmp_path, umask):
    path = tmp_path / "results.json"
    path.write_text("old")
    path.chmod(0o600)
    umask(0o022)
    write_json_atomic(path, {"a": 1})
    assert mode(path) == 0o644 and path.read_text() == '{\n  "a": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = write_text_atomic(tmp_path / "report.md", "old")
    with pytest.raises(TypeError):
        write_text_atomic(path, None)  # the temporary file exists when the write fails
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


# ---------------------------------------------------------------- a folder that can be written

def test_an_output_dir_that_is_a_file_fails(tmp_path):
    path = tmp_path / "run"
    path.write_text("")
    with pytest.raises(ConfigError, match=f"output_dir {path} is a file, not a folder: set output_dir"):
        check_output_dir(str(path), path)
    with pytest.raises(ConfigError, match=f"output_dir {path}/a/b lies under {path}, which is a file"):
        check_output_dir(f"{path}/a/b", path / "a" / "b")


def test_a_writable_output_dir_passes_and_is_left_as_it_was(tmp_path):
    check_output_dir(str(tmp_path), tmp_path)
    check_output_dir(str(tmp_path / "new" / "run"), tmp_path / "new" / "run")  # made later, by the run
    assert list(tmp_path.iterdir()) == []  # no probe file left, nothing made


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes whatever the mode bits say")
def test_an_output_dir_that_cannot_be_written_fails(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    try:
        with pytest.raises(ConfigError, match=f"output_dir {folder} is not writable"):
            check_output_dir(str(folder), folder)
        with pytest.raises(ConfigError, match=f"output_dir {folder}/run cannot be created: {folder} is not writable"):
            check_output_dir(str(folder / "run"), folder / "run")
    finally:
        folder.chmod(0o700)


def test_a_folder_on_a_read_only_mount_fails_even_for_root(tmp_path, monkeypatch):
    """The check writes a probe file rather than trusting the mode bits, which root passes anyway."""
    real_open = os.open

    def read_only(path, flags, mode=0o777):
        if ".plmq-probe." in str(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, mode)
    monkeypatch.setattr(outdir.os, "open", read_only)
    with pytest.raises(ConfigError, match=f"output_dir {tmp_path} is not writable .Read-only file system."):
        check_output_dir(str(tmp_path), tmp_path)
    with pytest.raises(ConfigError, match=f"{tmp_path}/run cannot be created: {tmp_path} is not writable"):
        check_output_dir(str(tmp_path / "run"), tmp_path / "run")


def test_the_runner_checks_output_dir_before_ray(tmp_path, monkeypatch):
    path = tmp_path / "run"
    path.write_text("")
    monkeypatch.setattr(runner, "ensure_ray", lambda: pytest.fail("Ray started before output_dir was checked"))
    with pytest.raises(ConfigError, match=f"output_dir {path} is a file"):
        runner.prepare(load_config(None, [f"output_dir={path}"]))
    result = CliRunner().invoke(app, ["run", "--output-dir", str(path)])
    assert result.exit_code == 2 and f"config error: output_dir {path} is a file" in result.output


# ---------------------------------------------------------------- one writer at a time

def write_lock(folder: Path, **holder) -> Path:
    path = folder / LOCK_FILE
    path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time(),
                                "command": "plmq run old.yaml", **holder}))
    return path


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def test_a_second_lock_on_a_folder_is_refused_naming_the_holder(tmp_path):
    with locked(tmp_path, str(tmp_path), "plmq run a.yaml") as path:
        holder = json.loads(path.read_text())
        assert (holder["pid"], holder["host"], holder["command"]) == (os.getpid(), socket.gethostname(),
                                                                       "plmq run a.yaml")
        with pytest.raises(ConfigError) as err:
            acquire(tmp_path, "plmq run b.yaml")
        message = str(err.value)
        assert f"output_dir {tmp_path} is in use by another plmq run: PID {os.getpid()} on " \
               f"{socket.gethostname()}" in message and "(plmq run a.yaml)" in message
        assert f"if that process is gone, remove {path} and run again" in message
        assert json.loads(path.read_text()) == holder  # the refused run left the lock alone
    assert not path.exists()
    with locked(tmp_path, str(tmp_path), "plmq run b.yaml"):  # free again
        pass


def test_a_lock_is_released_when_the_run_fails(tmp_path):
    with pytest.raises(RuntimeError, match="stage exploded"), locked(tmp_path, str(tmp_path), "plmq run"):
        raise RuntimeError("stage exploded")
    assert not (tmp_path / LOCK_FILE).exists()


@pytest.mark.parametrize("holder", [{"pid": "dead"}, {"started_at": 0.0}], ids=["dead-pid", "pid-reused"])
def test_a_lock_whose_holder_is_gone_is_taken_over(tmp_path, capsys, holder):
    """Gone: its PID runs nothing, or runs a process started after the lock was taken (the PID was reused)."""
    pid = dead_pid() if holder.get("pid") == "dead" else os.getpid()
    path = write_lock(tmp_path, **{**holder, "pid": pid})
    with locked(tmp_path, str(tmp_path), "plmq run new.yaml"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
        assert json.loads(path.read_text())["command"] == "plmq run new.yaml"
    assert f"WARNING: taking over the lock {path} of PID {pid} on {socket.gethostname()}" in capsys.readouterr().out
    assert not path.exists()


def test_a_lock_of_another_host_or_of_no_one_is_not_taken_over(tmp_path):
    path = write_lock(tmp_path, pid=dead_pid(), host="gpu-node-7")
    with pytest.raises(ConfigError, match="PID [0-9]+ on gpu-node-7"):
        acquire(tmp_path, "plmq run")
    path.write_text("")  # a holder killed between creating the file and writing it
    with pytest.raises(ConfigError, match=f"locked by {path}, which names no holder .* remove {path}"):
        acquire(tmp_path, "plmq run")


def test_of_runs_started_at_once_exactly_one_takes_the_lock(tmp_path):
    script = ("import sys, time; from pipelines.errors import ConfigError; from pipelines.outdir import locked\n"
              "try:\n    with locked(sys.argv[1], sys.argv[1], 'racer'):\n        print('took'); time.sleep(3)\n"
              "except ConfigError as err:\n    print('refused', err)\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT) for _ in range(4)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert sorted(o.split()[0] for o in outs) == ["refused", "refused", "refused", "took"], outs
    assert not (tmp_path / LOCK_FILE).exists()


def test_the_runner_holds_the_lock_while_it_runs(tmp_path, monkeypatch):
    """runner.run takes the lock after its checks, holds it over the stages and releases it, also on a failure;
    a folder another run holds is refused before any stage."""
    seen = []

    def stages_ran(cfg, stages, force, name, run_dir, local_root, start):
        seen.append(json.loads((local_root / LOCK_FILE).read_text())["pid"])
        if name == "fails":
            raise RuntimeError("a driver error")
        return "parent", dag.DagResult({}, [], {}), None
    monkeypatch.setattr(runner, "prepare", lambda cfg, model=None: cfg)
    monkeypatch.setattr(runner, "_under_parent_run", stages_ran)
    cfg, plan = SimpleNamespace(output_dir=str(tmp_path / "run")), [Stage("evaluate/sst2/fp", "evaluate", "sst2")]
    assert runner.run(cfg, plan).output_dir == str(tmp_path / "run") and seen == [os.getpid()]
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    with pytest.raises(RuntimeError, match="a driver error"):
        runner.run(cfg, plan, name="fails")
    assert not (tmp_path / "run" / LOCK_FILE).exists() and len(seen) == 2
    with locked(tmp_path / "run", cfg.output_dir, "plmq run other.yaml"), \
            pytest.raises(ConfigError, match="is in use by another plmq run"):
        runner.run(cfg, plan)
    assert len(seen) == 2  # no stage ran
