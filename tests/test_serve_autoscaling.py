"""Serve on an autoscaling cluster: the app deploys though no node can hold its model replicas
yet, becomes ready once the autoscaler adds one, and a replica no node type could hold fails
at once (issue #22).

The cluster is `cluster/fake_autoscaling.py`: a 2-CPU head and a node type `gpu_node`
({CPU: 1, fake_gpu: 1}, min_workers 0, max_workers 1) that the autoscaler (v2, as `ray up`
runs it) adds as another raylet on this machine; its node types are published to the GCS as
ray_cluster.yaml's head does. The model replicas ask for `fake_gpu`: a custom resource stands
for a GPU (a real `num_gpus` would move the model to CUDA), and placement treats both alike.
Each app runs in a driver subprocess, since this pytest process may already be connected to
the session's `ray_cluster`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.fake_autoscaling import FakeAutoscalingCluster
from tests.support.paths import REPO

GPU_NODE = {"resources": {"CPU": 1, "fake_gpu": 1}, "min_workers": 0, "max_workers": 1}
PROBLEM = "Ann has 3 bags of 4 apples and buys 2 more. How many apples does she have?"

# The driver: build_app against the live cluster, then serve.run and one /solve over HTTP.
DRIVER = r"""
import json, sys, time, urllib.request
import ray
from ray import serve
from serve.app import PlacementError, build_app

address, model, port, resource, problem = sys.argv[1:6]
ray.init(address=address, configure_logging=False, log_to_driver=False)
t0 = time.monotonic()
gpu = {"ray_actor_options": {"resources": {resource: 0.5}}}
args = {"decomposer": model, "solver": model, "max_new_tokens": 16, "num_threads": 1,
        "decomposer_options": gpu, "solver_options": gpu}
nodes = sorted(n["Resources"].get("fake_gpu", 0) for n in ray.nodes() if n["Alive"])
try:
    app = build_app(args)
except PlacementError as e:
    print(json.dumps({"error": str(e), "build_s": time.monotonic() - t0}), flush=True)
    sys.exit(3)
print(json.dumps({"built": True, "nodes_fake_gpu": nodes}), flush=True)
serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": int(port)})
serve.run(app, name="socratic", route_prefix="/")  # returns once the app is RUNNING
ready_s = time.monotonic() - t0
status = serve.status().applications["socratic"].status
body = json.dumps({"problem": problem, "max_steps": 2}).encode()
req = urllib.request.Request(f"http://127.0.0.1:{port}/solve", data=body,
                             headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=120) as r:
    code, reply = r.status, json.load(r)
after = sorted(n["Resources"].get("fake_gpu", 0) for n in ray.nodes() if n["Alive"])
print(json.dumps({"ready_s": ready_s, "app_status": str(status), "http": code,
                  "answer_key": "answer" in reply, "nodes_fake_gpu_after": after}), flush=True)
serve.shutdown()
"""


@pytest.fixture(scope="module")
def fake_cluster():
    cluster = FakeAutoscalingCluster(
        {"CPU": 2}, {"gpu_node": GPU_NODE}, env={"RAY_AUTH_MODE": "disabled"}
    )
    t0 = time.monotonic()
    cluster.start()
    print(f"\nfake autoscaling cluster up in {time.monotonic() - t0:.1f} s")
    try:
        yield cluster
    finally:
        cluster.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _drive(cluster, model: Path, resource: str, timeout_s: float) -> tuple[int, list[dict], str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    cmd = [sys.executable, "-c", DRIVER, cluster.address, str(model), str(_free_port()),
           resource, PROBLEM]  # fmt: skip
    try:
        done = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the driver ran past {timeout_s:g} s\n{e.stderr}\n{cluster.log_tail()}")
    lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    return done.returncode, lines, done.stdout[-3000:] + done.stderr[-6000:]


@pytest.mark.slow
def test_app_waits_for_the_autoscaler_and_then_answers(fake_cluster, tiny_model_dir) -> None:
    t0 = time.monotonic()
    rc, lines, out = _drive(fake_cluster, tiny_model_dir, "fake_gpu", timeout_s=240)
    print(f"driver: {time.monotonic() - t0:.1f} s; {lines}")
    assert rc == 0, out
    built, served = lines[0], lines[-1]
    assert built["nodes_fake_gpu"] == [0]  # only the head: no node could hold a model replica
    assert served["app_status"].endswith("RUNNING")
    assert served["http"] == 200 and served["answer_key"], out
    assert served["nodes_fake_gpu_after"] == [0, 1]  # the autoscaler added the gpu_node


@pytest.mark.slow
def test_a_replica_no_node_type_could_hold_fails_at_once(fake_cluster, tiny_model_dir) -> None:
    rc, lines, out = _drive(fake_cluster, tiny_model_dir, "tpu", timeout_s=120)
    assert rc == 3, out
    (err,) = lines
    assert "one Decomposer replica asks for" in err["error"] and "tpu 0.5" in err["error"]
    assert "nor does any node type the autoscaler can add" in err["error"]
    assert "gpu_node (" in err["error"]
    assert err["build_s"] < 10  # at once: no waiting for an autoscaler that cannot help
