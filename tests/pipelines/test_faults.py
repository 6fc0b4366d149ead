"""pipelines.faults: armed points exit (or hold) exactly once; anything else is refused."""
from __future__ import annotations

import subprocess
import sys

import pytest

from pipelines import faults

POINT = "from pipelines import faults; faults.point('mrem.module1', 25); print('passed')"


def _point(env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", POINT], env={**env, "PYTHONPATH": "."}, capture_output=True,
                          text=True, timeout=timeout)


def test_a_point_exits_once_then_lets_the_restarted_process_pass(tmp_path):
    env = {faults.ENV: "mrem.module1@25,other@3", faults.DIR_ENV: str(tmp_path)}
    first, second = _point(env), _point(env)
    assert first.returncode == faults.EXIT_CODE and "passed" not in first.stdout
    assert second.returncode == 0 and "passed" in second.stdout
    assert faults.fired(tmp_path) == ["mrem.module1@25"]


def test_a_held_point_stops_the_process_there(tmp_path):
    env = {faults.ENV: "mrem.module1@25:hold", faults.DIR_ENV: str(tmp_path)}
    with pytest.raises(subprocess.TimeoutExpired):
        _point(env, timeout=5)
    assert faults.fired(tmp_path) == ["mrem.module1@25"]
    assert _point(env).stdout.strip() == "passed"


def test_unarmed_points_return_and_bad_actions_are_refused(monkeypatch, tmp_path):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.point("mrem.module1", 25)
    assert faults.env_vars() == {} and faults.runtime_env() == {}
    monkeypatch.setenv(faults.ENV, "mrem.module1@25:pause")
    with pytest.raises(RuntimeError, match="site@step:hold"):
        faults.point("mrem.module1", 25)
    monkeypatch.setenv(faults.ENV, "mrem.module1@25")
    monkeypatch.delenv(faults.DIR_ENV, raising=False)
    with pytest.raises(RuntimeError, match=faults.DIR_ENV):
        faults.point("mrem.module1", 25)
