"""The `plmq` console script: help lists the stages; bad configs fail before work with exit 2."""
from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from pipelines.cli import app

runner = CliRunner()


def test_help_lists_stages():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for stage in ("run", "finetune", "evaluate", "rtn", "mrem"):
        assert stage in result.output


@pytest.mark.parametrize("args,message", [
    (["run", "--set", "finetune.epoch=1"], "unknown config key 'finetune.epoch'"),
    (["run", "--task", "sst3"], "unknown GLUE task 'sst3'"),
    (["finetune", "missing.yaml"], "missing.yaml does not exist"),
])
def test_bad_config_fails_fast(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "finetune" in out.stdout
