"""The app fits the cluster it starts on, and one that cannot be placed says so at once.

The unit tests size the app against stated cluster resources (and, on an autoscaling cluster,
the node types its autoscaler can add: issue #22); the end-to-end ones run `python
serve/app.py` as a user would, on a fresh local Ray cluster of 2 logical CPUs (the machine of
issue #14, where two 1-CPU model replicas left no room for the ingress and Serve waited for
ever). tests/test_serve_autoscaling.py runs the app on a fake autoscaling cluster.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from cluster.node_types import to_cluster_config
from serve.placement import (
    NodeType,
    PlacementError,
    check_fits,
    parse_node_types,
    replica_range,
    size_to_cluster,
)
from tests.support.paths import REPO

TWO_CPUS = {"CPU": 2.0, "memory": 8e9}


def _config_options(name: str = "config.yaml") -> dict:
    args = yaml.safe_load((REPO / "serve" / name).read_text())["applications"][0]["args"]
    return {
        "Decomposer": args.get("decomposer_options", {}),
        "Solver": args.get("solver_options", {}),
        "Ingress": args.get("ingress_options", {}),
    }


def _cpus_at_max(options: dict) -> float:
    return sum(replica_range(o)[1] * o["ray_actor_options"]["num_cpus"] for o in options.values())


def test_defaults_fit_two_cpus_with_room_for_the_ingress() -> None:
    sized = size_to_cluster({}, TWO_CPUS)
    assert sized["Ingress"]["ray_actor_options"]["num_cpus"] > 0
    assert _cpus_at_max(sized) <= 2.0
    check_fits(sized, TWO_CPUS, [TWO_CPUS])


@pytest.mark.parametrize("cpus", [1.0, 2.0, 4.0, 16.0])
def test_serve_config_fits_at_its_maximum_replicas(cpus: float) -> None:
    """`serve run serve/config.yaml`: every replica the autoscalers may start has room."""
    cluster = {"CPU": cpus}
    sized = size_to_cluster(_config_options(), cluster)
    assert _cpus_at_max(sized) <= cpus + 1e-9
    check_fits(sized, cluster, [cluster])


def test_stated_resources_are_kept_and_the_rest_share_what_is_left() -> None:
    sized = size_to_cluster({"Decomposer": {"ray_actor_options": {"num_cpus": 1.0}}}, {"CPU": 4.0})
    assert sized["Decomposer"]["ray_actor_options"]["num_cpus"] == 1.0
    assert sized["Solver"]["ray_actor_options"]["num_cpus"] == 1.0  # capped at one CPU
    assert _cpus_at_max(sized) <= 4.0


def test_too_much_asked_names_what_was_asked_and_what_there_is() -> None:
    opts = size_to_cluster(
        {"Solver": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 1.5}}}, TWO_CPUS
    )
    with pytest.raises(PlacementError) as e:
        check_fits(opts, TWO_CPUS, [TWO_CPUS])
    msg = str(e.value)
    assert "Solver 2 x (CPU 1.5)" in msg and "the cluster has CPU 2 in all" in msg


def test_a_replica_bigger_than_any_node_is_refused() -> None:
    cluster, nodes = {"CPU": 4.0}, [{"CPU": 2.0}, {"CPU": 2.0}]
    opts = size_to_cluster({"Solver": {"ray_actor_options": {"num_cpus": 3}}}, cluster)
    with pytest.raises(PlacementError, match="no node has that much"):
        check_fits(opts, cluster, nodes)


def test_gpus_are_checked_too() -> None:
    """serve/config.gpu.yaml's minimum replicas need one GPU (half a GPU per model replica)."""
    cpus = {"CPU": 8.0}
    opts = size_to_cluster(_config_options("config.gpu.yaml"), cpus)
    gpu_args = yaml.safe_load((REPO / "serve" / "config.gpu.yaml").read_text())
    per_replica = gpu_args["applications"][0]["args"]["num_gpus"]
    for name in ("Decomposer", "Solver"):  # what build_app does with args["num_gpus"]
        opts[name]["ray_actor_options"]["num_gpus"] = per_replica
    with pytest.raises(PlacementError, match="GPU 1"):
        check_fits(opts, cpus)
    with_gpu = {**cpus, "GPU": 1.0}
    check_fits(opts, with_gpu, [with_gpu])


# --- an autoscaling cluster: what it can grow to counts (issue #22) ---------------------------


def _gpu_config_options() -> dict:
    """serve/config.gpu.yaml's options as build_app makes them (args.num_gpus per model)."""
    opts = _config_options("config.gpu.yaml")
    args = yaml.safe_load((REPO / "serve" / "config.gpu.yaml").read_text())["applications"][0]
    for name in ("Decomposer", "Solver"):
        opts[name] = {**opts[name], "ray_actor_options": {**opts[name]["ray_actor_options"]}}
        opts[name]["ray_actor_options"]["num_gpus"] = args["args"]["num_gpus"]
    return opts


def _ray_cluster_yaml() -> tuple[dict, list[NodeType]]:
    """ray_cluster.yaml's head (the only node at start: min_workers 0) and the node types its
    head publishes (cluster/node_types.py, the same mapping growable_node_types reads back)."""
    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    head = config["available_node_types"][config["head_node_type"]]["resources"]
    head = {k: float(v) for k, v in head.items() if v}
    types = [
        NodeType({k: float(v) for k, v in g.resources.items()}, g.max_count, g.name)
        for g in to_cluster_config(config).node_group_configs
    ]
    return head, types


def test_published_node_types_are_the_workers_of_ray_cluster_yaml() -> None:
    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    groups = to_cluster_config(config).node_group_configs
    assert [g.name for g in groups] == ["gpu_a10g_x4"]  # the head never scales: left out
    (g,) = groups
    assert dict(g.resources) == {"CPU": 48, "GPU": 4, "worker": 1}
    assert (g.min_count, g.max_count) == (0, 3)
    publish = [c for c in config["head_start_ray_commands"] if "node_types.py publish" in c]
    assert len(publish) == 1 and "~/ray_bootstrap_config.yaml" in publish[0]


def test_gpu_config_waits_for_a_gpu_node_the_autoscaler_can_add(caplog) -> None:
    """serve/config.gpu.yaml on ray_cluster.yaml: no GPU node at start, one GPU type to add."""
    head, types = _ray_cluster_yaml()
    opts = size_to_cluster(_gpu_config_options(), head, types, [head])
    with pytest.raises(PlacementError, match="no node has that much"):
        check_fits(opts, head, [head])  # what build_app did before: present nodes only
    with caplog.at_level("INFO", logger="serve.placement"):
        check_fits(opts, head, [head], types)
    assert "adds a node of type gpu_a10g_x4" in caplog.text
    assert "Serve waits while the autoscaler adds nodes" in caplog.text  # GPU 1 at minimum


def test_a_replica_no_node_type_can_hold_is_refused_naming_the_node_types() -> None:
    head, types = _ray_cluster_yaml()
    opts = size_to_cluster({"Solver": {"ray_actor_options": {"num_gpus": 8}}}, head, types, [head])
    with pytest.raises(PlacementError) as e:
        check_fits(opts, head, [head], types)
    msg = str(e.value)
    assert "one Solver replica asks for" in msg and "GPU 8" in msg
    assert "nor does any node type the autoscaler can add" in msg
    assert "gpu_a10g_x4 (" in msg and "GPU 4" in msg and "max 3" in msg


def test_minimum_replicas_beyond_what_the_node_types_add_are_refused() -> None:
    head, types = _ray_cluster_yaml()  # at most 3 x 4 = 12 GPUs
    many = {"num_replicas": 13, "ray_actor_options": {"num_cpus": 1, "num_gpus": 1}}
    opts = size_to_cluster({"Solver": many}, head, types, [head])
    with pytest.raises(PlacementError) as e:
        check_fits(opts, head, [head], types)
    assert "Solver 13 x (CPU 1, GPU 1)" in str(e.value) and "can grow to" in str(e.value)
    assert "GPU 12" in str(e.value)


def test_a_custom_resource_is_checked_like_a_gpu() -> None:
    """What the fake cluster test uses: `fake_gpu` stands for a GPU on a CPU-only machine."""
    head = {"CPU": 2.0}
    types = parse_node_types([{"name": "gpu_node", "resources": {"CPU": 1, "fake_gpu": 1}}])
    half = {"ray_actor_options": {"resources": {"fake_gpu": 0.5}}}
    opts = size_to_cluster({"Decomposer": half, "Solver": half}, head, types, [head])
    check_fits(opts, head, [head], types)
    with pytest.raises(PlacementError, match="no node has that much"):
        check_fits(opts, head, [head], parse_node_types([{"CPU": 8}]))


def test_replicas_waiting_for_a_node_are_sized_to_that_node_type() -> None:
    """Two 0.5-fake_gpu replicas share one {CPU 1, fake_gpu 1} node: 0.5 CPU each. Sized to
    the 2-CPU head instead (0.95 each) the second would wait for ever on the only GPU node."""
    head = {"CPU": 2.0}
    types = parse_node_types([{"name": "gpu_node", "resources": {"CPU": 1, "fake_gpu": 1}}])
    half = {"ray_actor_options": {"resources": {"fake_gpu": 0.5}}}
    opts = size_to_cluster({"Decomposer": half, "Solver": half}, head, types, [head])
    for name in ("Decomposer", "Solver"):
        assert opts[name]["ray_actor_options"]["num_cpus"] == 0.5
    assert opts["Ingress"]["ray_actor_options"]["num_cpus"] == 0.1  # on the head, as before
    # A 0-CPU head (KubeRay's usual): CPU-only replicas share the largest node type's CPUs.
    zero = {"CPU": 0.0}
    opts = size_to_cluster({}, zero, parse_node_types([{"CPU": 8}]), [zero])
    assert opts["Decomposer"]["ray_actor_options"]["num_cpus"] == 1.0


def test_an_autoscaler_that_does_not_publish_its_node_types_only_warns(caplog) -> None:
    head = {"CPU": 8.0}
    opts = size_to_cluster(_gpu_config_options(), head)
    with caplog.at_level("WARNING", logger="serve.placement"):
        check_fits(opts, head, [head], None, may_grow=True)
    assert "does not publish its node types" in caplog.text


def test_a_plain_local_cluster_is_fixed(ray_cluster) -> None:
    """`ray.init()`'s head runs a read-only autoscaler: nothing to add, so nothing changes."""
    from serve.placement import autoscaler_running, growable_node_types

    assert growable_node_types() is None
    assert not autoscaler_running()


def test_node_types_argument_forms() -> None:
    got = parse_node_types(
        [
            {"CPU": 48, "GPU": 4},
            {"name": "a100", "resources": {"CPU": 96, "GPU": 8}, "max_workers": 2},
            {"name": "off", "resources": {"CPU": 4}, "max_workers": 0},  # can add none: dropped
        ]
    )
    assert got == [
        NodeType({"CPU": 48.0, "GPU": 4.0}, None, ""),
        NodeType({"CPU": 96.0, "GPU": 8.0}, 2, "a100"),
    ]
    with pytest.raises(ValueError, match=r"node_types\[0\]"):
        parse_node_types(["CPU: 4"])


# --- python serve/app.py on 2 logical CPUs -----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _app(model: Path, port: int, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    return subprocess.Popen(
        [sys.executable, "serve/app.py", "--decomposer", str(model), "--solver", str(model),
         "--address", "local", "--num-cpus", "2", "--port", str(port), "--max-new-tokens", "16",
         *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def _stop(proc: subprocess.Popen) -> tuple[str, str]:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            return proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.communicate()


@pytest.mark.slow
def test_the_app_starts_and_answers_on_two_cpus(tiny_model_dir: Path) -> None:
    port = _free_port()
    proc = _app(tiny_model_dir, port)
    try:
        deadline = time.monotonic() + 180  # a guard against a hang, not a timing assertion
        status = None
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                    status = r.status
                    break
            except OSError:
                time.sleep(1)
        assert status == 200, _stop(proc)
    finally:
        _stop(proc)


def test_a_bad_placement_fails_with_what_was_asked_and_what_there_is(tiny_model_dir) -> None:
    proc = _app(tiny_model_dir, _free_port(), "--model-cpus", "1.5")
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 2, out + err
    assert "cannot be placed" in err and "Decomposer 1 x (CPU 1.5)" in err
    assert "the cluster has CPU 2 in all" in err
