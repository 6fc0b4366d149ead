"""Shared fixtures: offline Hugging Face, one Ray session, a temporary MLflow store."""
from __future__ import annotations

import os
import random
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


_RAY_STATE: dict = {"kind": None, "cluster": None}


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The tests' models are tiny: in this process one torch thread is faster than two contending for
    the cores with Ray workers (which set their own thread counts)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ray_stop() -> None:
    import ray

    ray.shutdown()
    if _RAY_STATE["cluster"] is not None:
        _RAY_STATE["cluster"].shutdown()
    _RAY_STATE.update(kind=None, cluster=None)


def _ray_use(kind: str, start) -> None:
    """Reuse the running Ray instance when it is of `kind`, else restart it (~5 s)."""
    import ray

    if _RAY_STATE["kind"] == kind and ray.is_initialized():
        return
    _ray_stop()
    _RAY_STATE["cluster"] = start()
    _RAY_STATE["kind"] = kind


def _init(ray, **resources) -> None:
    ray.init(include_dashboard=False, log_to_driver=True, **resources)


@pytest.fixture
def ray_session():
    """A local Ray instance with 2 CPUs, shared by the tests that need nothing special."""
    import ray

    _ray_use("default", lambda: _init(ray, num_cpus=2))
    yield ray


@pytest.fixture
def ray_fake_gpus():
    """Ray with 4 logical CPUs and 4 fake GPUs (logical resources only)."""
    import ray

    _ray_use("fake_gpus", lambda: _init(ray, num_cpus=4, num_gpus=4))
    yield ray


@pytest.fixture
def ray_one_fake_gpu():
    """Ray with 2 logical CPUs and one fake GPU: a node whose one GPU module actors share (fractional num_gpus)."""
    import ray

    _ray_use("one_fake_gpu", lambda: _init(ray, num_cpus=2, num_gpus=1))
    yield ray


@pytest.fixture
def ray_two_nodes():
    """A head and a second node in one machine (`ray.cluster_utils.Cluster`)."""
    import ray
    from ray.cluster_utils import Cluster

    def start():
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 200 * 2**20})
        cluster.add_node(num_cpus=1, object_store_memory=200 * 2**20)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        return cluster

    _ray_use("two_nodes", start)
    yield ray


@pytest.fixture
def ray_nodes_to_lose():
    """A head with no CPU and two 1-CPU nodes: every worker runs on a node a test may remove
    (`cluster.remove_node`) and replace (`cluster.add_node`). Yields (ray, cluster); stopped after the test."""
    import ray
    from ray.cluster_utils import Cluster

    def start():
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 200 * 2**20})
        for _ in range(2):
            cluster.add_node(num_cpus=1, object_store_memory=200 * 2**20)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        return cluster

    _ray_use("nodes_to_lose", start)
    yield ray, _RAY_STATE["cluster"]
    _ray_stop()


@pytest.fixture(scope="session", autouse=True)
def _ray_teardown():
    yield
    _ray_stop()


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory):
    """Migrating a fresh sqlite store takes ~2 s: do it once, copy it per test."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_uri(_mlflow_template, tmp_path, monkeypatch):
    """A private MLflow tracking store for one test."""
    import mlflow

    db = tmp_path / "mlflow.db"
    shutil.copy(_mlflow_template, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("Default")  # not an experiment id an earlier test's store had active
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture
def cache_dir(tmp_path):
    """A private tokenized-data cache."""
    return str(tmp_path / "tok_cache")


POS = ["good", "great", "excellent", "wonderful", "superb", "lovely", "brilliant", "enjoyable"]
NEG = ["bad", "awful", "terrible", "horrible", "poor", "dreadful", "boring", "dull"]
FILLER = ["the", "movie", "was", "plot", "acting", "really", "quite", "film", "and", "story"]


def write_separable_sst2(root, n_train=600, n_dev=200, seed=0):
    """An SST-2-format folder whose label is decided by the polarity words: clearly separable."""
    rng = random.Random(seed)
    folder = root / "SST-2"
    folder.mkdir(parents=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        lines = ["sentence\tlabel"]
        for _ in range(n):
            label = rng.randint(0, 1)
            words = rng.sample(FILLER, 4) + rng.sample(POS if label else NEG, 2)
            rng.shuffle(words)
            lines.append(f"{' '.join(words)}\t{label}")
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def separable_glue(tmp_path):
    """A glue_data/ folder with a clearly separable SST-2 task (dir source)."""
    return write_separable_sst2(tmp_path / "glue_data")


@pytest.fixture
def tiny_teacher(tmp_path):
    """A saved tiny-bert classifier checkpoint (random weights), as `finetune` writes them."""
    from pipelines import checkpoints, models

    tok = models.load_tokenizer("tiny-bert")
    model = models.load_classifier("tiny-bert", 2, seed=3)
    checkpoints.save(model, tok, tmp_path / "fp", {"task": "sst2"}, "fp")
    return str(tmp_path / "fp")


@pytest.fixture
def tiny_data(separable_glue, cache_dir):
    """DataConfig reading the separable SST-2 folder, short sequences."""
    from pipelines.config import DataConfig

    return DataConfig(source="dir", dir=str(separable_glue), max_length=16, cache_dir=cache_dir)


@pytest.fixture
def tiny_run_cfg(separable_glue, cache_dir, tmp_path):
    """A RunConfig on tiny-bert and the separable SST-2 folder; extra `key=value` overrides as arguments."""
    from pipelines.config import load_config

    def make(*overrides: str):
        return load_config(None, ["model=tiny-bert", "tasks=[sst2]", f"output_dir={tmp_path / 'out'}",
                                  "data.source=dir", f"data.dir={separable_glue}", "data.max_length=16",
                                  f"data.cache_dir={cache_dir}", *overrides])
    return make


@pytest.fixture
def inject_faults(monkeypatch, tmp_path):
    """Arm fault points (`pipelines.faults`, e.g. "mrem.module1@25") for this test, in this process and in the
    Ray tasks and actors it starts; returns a function that lists the points that fired."""
    from pipelines import faults

    folder = tmp_path / "faults"
    folder.mkdir()

    def arm(*points: str):
        monkeypatch.setenv(faults.ENV, ",".join(points))
        monkeypatch.setenv(faults.DIR_ENV, str(folder))
        return lambda: faults.fired(folder)

    return arm
