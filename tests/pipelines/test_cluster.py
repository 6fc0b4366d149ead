"""cluster.yaml passes Ray's own validator; resource decisions follow the cluster."""
from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from pipelines.cluster import worker_resources

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"


def test_cluster_yaml_is_valid_for_the_autoscaler():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(CLUSTER_YAML.read_text())
    validate_config(prepare_config(raw))
    gpu = raw["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["resources"]["GPU"] == 1


def test_cluster_yaml_typo_is_rejected():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(CLUSTER_YAML.read_text())
    gpu = raw["available_node_types"]["gpu_worker"]
    gpu["max_worker"] = gpu.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(raw))


@pytest.mark.ray
def test_worker_resources_follow_the_cluster(ray_session):
    cpu = worker_resources("auto", cpus_per_worker=2)
    assert not cpu.use_gpu and cpu.as_options() == {"num_cpus": 2, "num_gpus": 0.0} and cpu.torch_device == "cpu"
    assert worker_resources("true").use_gpu  # allowed: an autoscaler may add GPU nodes


@pytest.mark.ray
def test_unplaceable_workers_time_out_with_a_clear_error(ray_session):
    from pipelines.cluster import spread_placement

    with pytest.raises(TimeoutError, match="could not place them"):
        spread_placement(worker_resources("true"), 2, timeout_s=1)
    with pytest.raises(ValueError, match="use auto, true or false"):
        worker_resources("yes")


@pytest.mark.ray
def test_autoscaler_node_types_count_as_capacity(ray_session):
    """With cluster.yaml named, `auto` picks GPUs before any GPU node exists and K uses the GPU type's max_workers."""
    from pipelines.cluster import resolve_resources
    from pipelines.config import ConfigError, load_config

    cluster_yaml = str(Path(__file__).resolve().parents[2] / "cluster.yaml")
    cfg = load_config(None, ["model=tiny-bert", "mrem.quant=[w4a8]", f"cluster.autoscaler_config={cluster_yaml}"])
    resolved = resolve_resources(cfg)
    assert resolved.finetune.use_gpu == "true" and resolved.mrem.use_gpu == "true"
    assert resolved.mrem.modules == 4  # min(8 one-GPU nodes, tiny-bert's 4 layers)
    local = resolve_resources(load_config(None, ["model=tiny-bert", "mrem.quant=[w4a8]"]))
    assert local.mrem.use_gpu == "false" and local.mrem.modules == 2  # 2 CPUs, 1 per actor
    with pytest.raises(ConfigError, match="largest node"):
        resolve_resources(load_config(None, ["model=tiny-bert", "mrem.quant=[w4a8]", "mrem.cpus_per_actor=16",
                                             f"cluster.autoscaler_config={cluster_yaml}"]))


def test_mrem_module_count_is_decided_in_one_place():
    from pipelines.cluster import mrem_modules
    from pipelines.config import MremConfig

    assert mrem_modules(MremConfig(mode="rem", modules=3), room=8, layers=4) == 1  # rem: the whole model
    assert mrem_modules(MremConfig(modules=3), room=8, layers=4) == 3               # as configured
    assert mrem_modules(MremConfig(), room=8, layers=4) == 4                        # one module per layer at most
    assert mrem_modules(MremConfig(mode="sequential"), room=2, layers=4) == 2       # as many actors as fit


@pytest.mark.ray
def test_k_follows_the_model_mrem_splits(ray_session):
    """A single-stage verb splits the user's checkpoint, not `model`: K counts that checkpoint's layers."""
    from pipelines.cluster import resolve_resources
    from pipelines.config import load_config

    cluster_yaml = str(Path(__file__).resolve().parents[2] / "cluster.yaml")
    cfg = load_config(None, ["model=minilm-l6", "mrem.quant=[w4a8]", f"cluster.autoscaler_config={cluster_yaml}"])
    assert resolve_resources(cfg).mrem.modules == 6
    assert resolve_resources(cfg, model="tiny-bert").mrem.modules == 4


def test_gpu_shares_count_in_ray_units():
    """K actors of gpus_per_actor fit a node with G GPUs when K * gpus_per_actor <= G (no float rounding loss)."""
    from pipelines.cluster import _fits, actor_resources
    from pipelines.config import MremConfig

    one_gpu = {"CPU": 16, "GPU": 1}
    assert [_fits({"CPU": 1, "GPU": g}, one_gpu) for g in (1.0, 0.5, 0.25, 0.1)] == [1, 2, 4, 10]
    assert _fits({"CPU": 1, "GPU": 2}, {"CPU": 16, "GPU": 4}) == 2
    half = actor_resources(MremConfig(use_gpu="true", gpus_per_actor=0.5, cpus_per_actor=2))
    assert half.as_options() == {"num_cpus": 2, "num_gpus": 0.5} and half.bundle == {"CPU": 2, "GPU": 0.5}
    assert actor_resources(MremConfig(use_gpu="false", gpus_per_actor=0.5)).bundle == {"CPU": 1}


@pytest.mark.ray
def test_k_counts_actors_sharing_one_gpu(ray_one_fake_gpu):
    """One node with 2 CPUs and 1 GPU: half a GPU per actor holds K = 2 module actors, a whole GPU K = 1."""
    from pipelines.cluster import resolve_resources
    from pipelines.config import ConfigError, load_config

    def cfg(*more: str):
        return load_config(None, ["model=tiny-bert", "mrem.quant=[w4a8]", *more])

    assert resolve_resources(cfg("mrem.gpus_per_actor=0.5")).mrem.modules == 2
    assert resolve_resources(cfg("mrem.gpus_per_actor=0.5")).mrem.use_gpu == "true"  # auto: the node has a GPU
    assert resolve_resources(cfg()).mrem.modules == 1
    assert resolve_resources(cfg("mrem.gpus_per_actor=0.25")).mrem.modules == 2  # the 2 CPUs bound it
    with pytest.raises(ConfigError, match="gpus_per_actor"):
        resolve_resources(cfg("mrem.gpus_per_actor=2"))
    with pytest.raises(ConfigError, match=r"mrem.modules=2: the cluster cannot hold 2 .* share GPUs"):
        resolve_resources(cfg("mrem.modules=2"))  # a whole GPU each: the second actor would wait for the first
    assert resolve_resources(cfg("mrem.modules=2", "mrem.gpus_per_actor=0.5")).mrem.modules == 2
    # mrem-e2e's data-parallel workers take the module actors' resources once MREM is done: as many fit
    assert resolve_resources(cfg("mrem.gpus_per_actor=0.5", "mrem.e2e.enabled=true")).mrem.e2e.workers is None
    with pytest.raises(ConfigError, match=r"mrem.e2e.workers=3: the cluster cannot hold 3"):
        resolve_resources(cfg("mrem.gpus_per_actor=0.5", "mrem.e2e.enabled=true", "mrem.e2e.workers=3"))


def test_the_head_keeps_its_dashboard_on_loopback():
    """Job submission and the state API are reached through `ray dashboard cluster.yaml` (an SSH tunnel)."""
    commands = " ".join(yaml.safe_load(CLUSTER_YAML.read_text())["head_start_ray_commands"])
    assert "ray start --head" in commands and "--dashboard-host" not in commands
