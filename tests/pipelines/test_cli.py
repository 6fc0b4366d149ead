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
    (["run", "--task", "sst3"], "unknown task 'sst3'"),
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


@pytest.mark.ray
def test_single_stage_verb_runs_through_the_driver(ray_session, mlflow_uri, tiny_teacher, separable_glue, cache_dir,
                                                    tmp_path):
    """`plmq evaluate CHECKPOINT` is a plan of one evaluate stage (and its report) run by the same runner:
    recorded in the store, so the same command again skips it."""
    args = ["evaluate", tiny_teacher, "--task", "sst2", "--output-dir", str(tmp_path / "out"),
            "--set", "data.source=dir", "--set", f"data.dir={separable_glue}", "--set", "data.max_length=16",
            "--set", f"data.cache_dir={cache_dir}", "--set", "experiment=cli-test"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "| sst2 | checkpoint |" in first.output
    assert (tmp_path / "out" / "stages" / "evaluate__sst2__checkpoint.json").exists()
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "1 stage(s) already complete" in again.output


def test_a_checkpoint_is_not_used_for_another_task(tiny_teacher, separable_glue):
    """tiny_teacher was fine-tuned for sst2: evaluating or quantizing it as an RTE model fails before work."""
    for verb in (["evaluate", tiny_teacher], ["rtn", tiny_teacher, "--quant", "w8a8"]):
        result = runner.invoke(app, [*verb, "--task", "rte"])
        assert result.exit_code == 2
        assert "was fine-tuned on sst2, so its head does not answer rte: pass --task sst2" in result.output
