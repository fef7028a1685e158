"""The app fits the cluster it starts on, and one that cannot be placed says so at once.

The unit tests size the app against stated cluster resources; the end-to-end ones run
`python serve/app.py` as a user would, on a fresh local Ray cluster of 2 logical CPUs (the
machine of issue #14, where two 1-CPU model replicas left no room for the ingress and Serve
waited for ever).
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

from serve.placement import PlacementError, check_fits, replica_range, size_to_cluster
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
