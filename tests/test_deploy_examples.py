"""The deployment examples users copy (experiments/clusters/: a Ray cluster-launcher YAML for AWS GPU nodes and a
KubeRay RayJob): their entrypoints are `uda-ray` commands the real parser accepts, the files they name exist and
load, their storage is a cloud URI that pyarrow resolves to an object store, and the nodes they ask for can hold the
trials uda_ray will ask them to run. Nothing is run or connected to."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from uda_ray import cli
from uda_ray.driver.prepare import overrides_dict
from uda_ray.search.space import load_space

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = REPO / "experiments" / "clusters"
LAUNCHER, RAYJOB = CLUSTERS / "aws-gpu.yaml", CLUSTERS / "kuberay-rayjob.yaml"
IMAGE_ROOT = "/app/"  # where the RayJob's image holds this repository


def _launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def _rayjob() -> dict:
    return yaml.safe_load(RAYJOB.read_text())


def _sweep_args(entrypoint: str):
    """The entrypoint parsed by uda-ray's own parser (as the shell would split it)."""
    argv = shlex.split(entrypoint)
    assert argv[0] == "uda-ray", entrypoint
    return cli.parser().parse_args(argv[1:])


def _space(args):
    path = args.space[len(IMAGE_ROOT):] if args.space.startswith(IMAGE_ROOT) else args.space
    assert (REPO / path).is_file(), f"{args.space}: no such space file in the repository"
    return load_space(REPO / path, overrides_dict(args.set))  # the strict loader: every key and --set checked


def _entrypoints() -> list[tuple[str, str]]:
    return [("launcher", _launcher()["metadata"]["uda_ray"]["entrypoint"]), ("rayjob", _rayjob()["spec"]["entrypoint"])]


def test_the_cluster_launcher_yaml_is_valid_for_ray_up():
    import json

    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(_launcher(), schema)  # the schema Ray ships, which `ray up` validates a config against


def test_the_rayjob_is_a_kuberay_rayjob_with_a_head_and_a_gpu_worker_group():
    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert [g["groupName"] for g in spec["workerGroupSpecs"]] == ["gpu"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True


@pytest.mark.parametrize("which, entrypoint", _entrypoints())
def test_the_entrypoint_is_a_sweep_the_cli_accepts_with_files_that_load(which, entrypoint):
    args = _sweep_args(entrypoint)
    assert args.cmd == "sweep" and args.fn is cli.cmd_sweep
    sp = _space(args)
    assert sp.base.train.use_gpu, f"{which}: a GPU cluster example should train on its GPUs"
    base = Path(sp.path).parent / yaml.safe_load(Path(sp.path).read_text())["base"]
    assert base.is_file(), f"{which}: the space's base experiment {base} is missing"
    for key in ("data.source_root", "data.target_root"):
        assert overrides_dict(args.set)[key].startswith("/data/"), f"{which}: {key} outside the mounted /data"


@pytest.mark.parametrize("which, entrypoint", _entrypoints())
def test_the_storage_is_an_object_store_uri_that_pyarrow_resolves(which, entrypoint):
    import pyarrow.fs

    storage = _sweep_args(entrypoint).storage
    assert storage.startswith("s3://"), f"{which}: the nodes share no disk; --storage must be cloud storage"
    fs, path = pyarrow.fs.FileSystem.from_uri(storage)  # region given: no lookup, nothing contacted
    assert isinstance(fs, pyarrow.fs.S3FileSystem) and path == "my-bucket/uda_ray"


def _trial_needs(sp) -> tuple[float, int]:
    """(CPUs, GPUs) of one trial on one node, as uda_ray asks Ray for them (search.driver.trial_resources)."""
    tc = sp.base.train
    assert tc.inline, "the examples size nodes for single-worker (inline) trials"
    return tc.cpus_per_worker, 1 if tc.use_gpu else 0


def test_the_launcher_gpu_nodes_fit_a_trial_and_enough_of_them_for_the_concurrent_trials():
    cfg = _launcher()
    sp = _space(_sweep_args(cfg["metadata"]["uda_ray"]["entrypoint"]))
    cpus, gpus = _trial_needs(sp)
    worker = cfg["available_node_types"]["gpu_worker"]
    assert worker["resources"]["GPU"] >= gpus and worker["resources"]["CPU"] >= cpus
    per_node = min(worker["resources"]["GPU"] // gpus, int(worker["resources"]["CPU"] // cpus))
    assert worker["max_workers"] * per_node >= sp.max_concurrent_trials
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert cfg["max_workers"] >= worker["max_workers"]


def _k8s_cpus(v: str | int) -> float:
    v = str(v)
    return float(v[:-1]) / 1000 if v.endswith("m") else float(v)


def test_the_rayjob_gpu_pods_fit_a_trial_and_enough_of_them_for_the_concurrent_trials():
    job = _rayjob()
    sp = _space(_sweep_args(job["spec"]["entrypoint"]))
    cpus, gpus = _trial_needs(sp)
    spec = job["spec"]["rayClusterSpec"]
    group = spec["workerGroupSpecs"][0]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= gpus and _k8s_cpus(limits["cpu"]) >= cpus
    per_pod = min(int(limits["nvidia.com/gpu"]) // gpus, int(_k8s_cpus(limits["cpu"]) // cpus))
    assert group["maxReplicas"] * per_pod >= sp.max_concurrent_trials
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    assert spec["rayVersion"] == __import__("ray").__version__  # the cluster runs the Ray uda_ray pins
