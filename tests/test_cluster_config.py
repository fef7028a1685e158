"""`ray_cluster.yaml` passes the validation `ray up` runs, and asks for what this project needs.

`ray up` loads the YAML, runs `prepare_config` (merge with the provider's defaults.yaml, merge
setup commands, fill per-type min/max workers) and then `validate_config` (ray-schema.json plus
cross-field checks), both from `ray.autoscaler._private.util`, before it asks AWS for anything.
The test runs exactly those two, so a typo in a key or a float resource fails here, not after a
`ray up` has started billing. The rest checks the cluster against the project: GPU workers that
hold the GPU training config, the project installed from its own files with CI's pins, and no
secret values.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from socratic.config import parse_config
from tests.support.paths import REPO
from trainers.config import TrainConfig

CLUSTER_YAML = REPO / "ray_cluster.yaml"
GPU_TRAIN_CONFIG = REPO / "trainers" / "configs" / "gpu_gpt2_large.yaml"


def constraint_pins() -> dict[str, str]:
    """`name==version` lines of constraints.txt (the set CI installs)."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(raw: dict[str, Any]) -> dict[str, Any]:
    return prepare_config(copy.deepcopy(raw))


def gpu_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: t
        for name, t in config["available_node_types"].items()
        if t["resources"].get("GPU", 0) > 0
    }


def test_passes_the_validation_ray_up_runs(prepared: dict[str, Any]) -> None:
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.update(setup_command=[]),  # misspelt key
        lambda c: c["available_node_types"]["head"]["resources"].update(CPU=0.5),  # not an int
        # a global ceiling below the node types' min_workers
        lambda c: (
            c["available_node_types"]["gpu_a10g_x4"].update(min_workers=1),
            c.update(max_workers=0),
        ),
    ],
    ids=["unknown-key", "float-resource", "max-below-min"],
)
def test_the_validator_is_live(raw: dict[str, Any], mutate) -> None:
    """The same calls reject broken variants, so a pass above means something."""
    broken = copy.deepcopy(raw)
    mutate(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(prepare_config(broken))


def test_cpu_head_and_autoscaled_gpu_workers(prepared: dict[str, Any]) -> None:
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    assert head["resources"].get("head") == 1  # same custom resource as the local cluster
    gpus = gpu_types(prepared)
    assert gpus, "no GPU worker type"
    for name, t in gpus.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= prepared["max_workers"], name
        assert t["resources"].get("worker") == 1, name


def test_gpu_workers_hold_both_roles_of_the_gpu_training_config(prepared: dict[str, Any]) -> None:
    """trainers/configs/gpu_gpt2_large.yaml trains its roles at once: the autoscaler's ceiling
    must hold all their workers, and one node must hold a worker's CPUs with its GPU."""
    cfg = parse_config(TrainConfig, ["--config", str(GPU_TRAIN_CONFIG), "--data", "s3://b/a"])
    scalings = [cfg.scaling_for(role) for role in cfg.role_list]
    assert all(s.use_gpu for s in scalings)
    gpus_needed = sum(s.num_workers * s.gpus_per_worker for s in scalings)
    gpus = gpu_types(prepared)
    assert sum(t["resources"]["GPU"] * t["max_workers"] for t in gpus.values()) >= gpus_needed
    for name, t in gpus.items():
        for s in scalings:
            per_node = t["resources"]["GPU"] // s.gpus_per_worker
            assert per_node >= 1, name
            assert per_node * s.cpus_per_worker <= t["resources"]["CPU"], (name, s)


def test_setup_installs_this_project_from_its_files(prepared: dict[str, Any]) -> None:
    # file_mounts' local "." is the checkout: `ray up` is run from the repo root.
    synced = [r for r, local in prepared["file_mounts"].items() if (REPO / local).resolve() == REPO]
    assert len(synced) == 1, prepared["file_mounts"]
    remote = synced[0]
    pins = constraint_pins()
    for key in ("head_setup_commands", "worker_setup_commands"):  # setup_commands merged in
        cmds = prepared[key]
        torch = [c for c in cmds if re.search(r"pip install .*\btorch==", c)]
        assert torch, f"{key}: no pinned GPU torch install"
        assert f"torch=={pins['torch']}" in torch[0]
        assert "--index-url https://download.pytorch.org/whl/cu" in torch[0]
        project = [c for c in cmds if f"cd {remote}" in c and "-e ." in c]
        assert project, f"{key}: the project is not installed from {remote}"
        assert "-c constraints.txt" in project[0]
        assert cmds.index(torch[0]) < cmds.index(project[0]), "torch must come first"


def test_ray_pin_equals_constraints_and_the_local_ray(prepared: dict[str, Any]) -> None:
    """The launcher (this venv), the cluster and CI must run one Ray version."""
    text = "\n".join(prepared["head_setup_commands"] + prepared["worker_setup_commands"])
    pinned = set(re.findall(r"ray(?:\[[^\]]*\])?==([0-9][^\s\"']*)", text))
    assert pinned == {constraint_pins()["ray"]}
    assert constraint_pins()["ray"] == ray.__version__


def test_secrets_come_from_the_nodes_never_from_the_config(raw: dict[str, Any]) -> None:
    text = yaml.safe_dump(raw)  # what the launcher copies to the head, comments dropped
    assert not re.search(r"sk-[A-Za-z0-9]{8,}", text)
    assert not re.search(r"(API_KEY|TOKEN|SECRET)[A-Z_]*=", text)
    secrets_file = "~/.socratic-distill/secrets.env"
    assert raw["file_mounts"][secrets_file] == secrets_file
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in raw[key] if "ray start" in c)
        assert start.index(f". {secrets_file}") < start.index("ray start"), key
        assert "RAY_AUTH_MODE=token" in start, key


def test_local_paths_in_file_mounts_are_documented() -> None:
    """`ray up` asserts every local file_mounts path exists: the README says how to create them."""
    readme = (REPO / "README.md").read_text()
    assert "ray get-auth-token --generate" in readme
    assert "~/.socratic-distill/secrets.env" in readme
    assert Path(REPO / "constraints.txt").is_file()
