"""MLflow browsing for real: `mlflow server` on 127.0.0.1, `plmq run` against it, the REST API,
and the experiment page rendered in headless Chromium (Debian's package; `make test` installs it when missing)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from bench.common import free_port, stop_process_group

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("PLMQ_TEST_ARTIFACTS", ROOT / "runs" / "test-artifacts"))
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"]  # this machine's network is closed


def ensure_chromium() -> str:
    """The browser's path; the test skips, saying how to get it, when it is missing (tests install nothing)."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: run `make test` as root with apt-get (it installs Debian's chromium "
                    "first), or `apt-get install chromium`")
    return CHROMIUM


def api(base: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", str(tmp_path / "artifacts")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        server.kill()
        pytest.fail("mlflow server did not come up")
    yield base
    stop_process_group(server)


def _open_runs_page(base: str, exp_id: str, parent_name: str, shot: Path) -> str:
    """Render the experiment's runs table, expand the parent run, return the visible text."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=ensure_chromium(), args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(f"{base}/#/experiments/{exp_id}/runs")  # the training-runs table
        page.get_by_text(parent_name).first.wait_for(timeout=60_000)
        page.locator("button[data-component-id*='runnamecellrenderer']").first.click()  # the "+" of the parent
        page.get_by_text("finetune/sst2").first.wait_for(timeout=30_000)
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot))
        text = page.inner_text("body")
        browser.close()
    return text


@pytest.mark.slow
def test_runs_browsable_in_mlflow_ui(tmp_path, mlflow_server):
    ensure_chromium()
    base = mlflow_server
    env = {**os.environ, "MLFLOW_TRACKING_URI": base, "RAY_ADDRESS": ""}
    cmd = [sys.executable, "-m", "pipelines.cli", "run", "configs/tiny.yaml", "--set", f"output_dir={tmp_path / 'run'}",
           "--set", f"data.cache_dir={tmp_path / 'tok'}", "--set", "mrem.quant=[]", "--set", "prequant.quant=[]",
           "--set", "rtn.quant=[w4a8]", "--set", "data.train_examples=128"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]

    exp = api(base, "experiments/get-by-name?experiment_name=plmq-tiny-bert-sst2")["experiment"]
    runs = api(base, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]
    tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
    parents = [rid for rid, t in tags.items() if "mlflow.parentRunId" not in t]
    assert len(parents) == 1
    parent = tags[parents[0]]
    assert {"plmq.git_commit", "plmq.config_hash", "plmq.ray_resources"} <= set(parent)
    assert json.loads(parent["plmq.ray_resources"])["CPU"] >= 1
    children = {t["mlflow.runName"] for t in tags.values() if t.get("mlflow.parentRunId") == parents[0]}
    assert {"finetune/sst2", "evaluate/sst2/fp", "rtn/sst2/w4a8"} <= children
    files = {f["path"] for f in api(base, f"artifacts/list?run_id={parents[0]}").get("files", [])}
    assert {"comparison.json", "report.md", "report.csv", "accuracy_vs_bits.png"} <= files

    shot = ARTIFACTS / "mlflow_ui_runs.png"
    text = _open_runs_page(base, exp["experiment_id"], parent["mlflow.runName"], shot)
    for name in ("finetune/sst2", "evaluate/sst2/fp", "rtn/sst2/w4a8", parent["mlflow.runName"]):
        assert name in text, f"{name} not rendered"
    assert shot.stat().st_size > 10_000
