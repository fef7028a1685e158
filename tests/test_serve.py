"""Ray Serve end to end: real deployments of the tiny student, real HTTP on loopback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.paths import REPO

# Every replica of every app in this module must fit in the test cluster's 4 logical CPUs.
SMALL = {"ray_actor_options": {"num_cpus": 0.25}}
PROBLEM = "Ann has 3 bags of 4 apples and buys 2 more. How many apples does she have?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_model_dir: Path):
    from ray import serve

    from serve.app import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    app = build_app(
        {
            "decomposer": str(tiny_model_dir),
            "solver": str(tiny_model_dir),
            "max_new_tokens": 24,
            "num_threads": 1,
            "decomposer_options": SMALL,
            "solver_options": SMALL,
        }
    )
    serve.run(app, name="socratic", route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def _post(url: str, body: bytes | str | dict, timeout: float = 120) -> tuple[int, bytes]:
    data = (
        body
        if isinstance(body, bytes)
        else (body.encode() if isinstance(body, str) else json.dumps(body).encode())
    )
    req = urllib.request.Request(
        f"{url}/solve", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _solver_calls() -> int:
    from ray import serve

    handle = serve.get_deployment_handle("Solver", app_name="socratic")
    return handle.stats.remote().result()["calls"]


def test_solve_reply_shape_and_one_solver_call_per_step(served: str) -> None:
    before = _solver_calls()
    status, raw = _post(served, {"problem": PROBLEM, "max_steps": 3})
    assert status == 200, raw
    out = json.loads(raw)
    assert set(out) == {"answer", "steps", "timings"}
    assert 1 <= len(out["steps"]) <= 3
    assert all(set(s) == {"question", "answer"} for s in out["steps"])
    assert {"decompose_s", "total_s", "request_s"} <= set(out["timings"])
    assert _solver_calls() - before == len(out["steps"])


def test_concurrent_calls_share_a_batch_and_match_single_calls(served: str, tiny_model_dir) -> None:
    """Calls that queue while the replica generates become one batch, and batching changes no
    text: each answer equals the same prompt generated alone, in-process."""
    from ray import serve

    from socratic.formats import decomposer_prompt
    from socratic.generate import Generator

    handle = serve.get_deployment_handle("Decomposer", app_name="socratic")
    handle.reset_stats.remote().result()
    prompts = [decomposer_prompt(f"{PROBLEM} Try {i}.") for i in range(8)]
    texts = [r.result() for r in [handle.generate.remote(p) for p in prompts]]
    counts = handle.stats.remote().result()["batch_size_counts"]
    assert sum(k * n for k, n in counts.items()) == 8 and max(counts) > 1, counts
    alone = Generator(tiny_model_dir, max_new_tokens=24)
    assert texts == [alone([p])[0] for p in prompts]


def test_stream_sends_one_event_per_step_then_done(served: str) -> None:
    status, raw = _post(served, {"problem": PROBLEM, "max_steps": 2, "stream": True})
    assert status == 200
    events = [block for block in raw.decode().split("\n\n") if block.strip()]
    kinds = [e.splitlines()[0] for e in events]
    done = json.loads(events[-1].splitlines()[1][len("data: ") :])
    assert kinds[-1] == "event: done"
    assert kinds[:-1] == ["event: step"] * len(done["steps"])
    steps = [json.loads(e.splitlines()[1][len("data: ") :]) for e in events[:-1]]
    assert [s["k"] for s in steps] == list(range(1, len(done["steps"]) + 1))


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not valid JSON"),
        ({"problem": ""}, 422, "empty"),
        ({"problem": "   "}, 422, "empty"),
        ({}, 422, "required"),
        ({"problem": 5}, 422, "must be a string"),
        ({"problem": "x" * 5000}, 413, "limit is 2000"),
        ({"problem": PROBLEM, "max_steps": "3"}, 422, "integer"),
        ({"problem": PROBLEM, "max_steps": 0}, 422, "between 1 and"),
        ({"problem": PROBLEM, "stream": "yes"}, 422, "true or false"),
        ({"problem": PROBLEM, "prblem": 1}, 422, "unknown fields: prblem"),
        ([1, 2], 422, "JSON object"),
    ],
)
def test_bad_input_gets_a_clear_4xx(served: str, body, status: int, message: str) -> None:
    got, raw = _post(served, body)
    assert got == status, raw
    assert message in json.loads(raw)["detail"]


def test_health_and_openapi(served: str) -> None:
    with urllib.request.urlopen(f"{served}/healthz", timeout=30) as r:
        assert json.load(r) == {"status": "ok"}
    with urllib.request.urlopen(f"{served}/openapi.json", timeout=30) as r:
        assert "/solve" in json.load(r)["paths"]


def test_deployments_are_separate_and_running(served: str) -> None:
    from ray import serve

    app = serve.status().applications["socratic"]
    assert {"Decomposer", "Solver", "Ingress"} <= set(app.deployments)
    assert all(d.status == "HEALTHY" for d in app.deployments.values())


def test_client_prints_the_trace(served: str) -> None:
    out = subprocess.run(
        [sys.executable, "serve/client.py", PROBLEM, "--url", served, "--max-steps", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Q1: ") and "answer: " in out.stdout


def _replicas(app_name: str, deployment: str) -> int:
    from ray import serve

    d = serve.status().applications[app_name].deployments[deployment]
    return int(d.replica_states.get("RUNNING", 0))


def test_each_deployment_scales_on_its_own_config(served: str, tiny_model_dir: Path) -> None:
    """Under the same load the solver (1 -> 2 replicas allowed) scales out while the
    decomposer (held at 1) does not: two deployments, two autoscaling configs."""
    import concurrent.futures
    import time

    from ray import serve

    from serve.app import build_app

    fast_up = {
        "upscale_delay_s": 0.5,
        "downscale_delay_s": 600,
        "metrics_interval_s": 0.5,
        "look_back_period_s": 1.0,
    }
    app = build_app({
        "decomposer": str(tiny_model_dir), "solver": str(tiny_model_dir),
        "max_new_tokens": 48, "max_batch_size": 1, "num_threads": 1,
        "decomposer_options": {**SMALL, "autoscaling_config": {
            "min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 1, **fast_up}},
        "solver_options": {
            "autoscaling_config": {
                "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, **fast_up},
            "ray_actor_options": {"num_cpus": 0.25}},
    })  # fmt: skip
    serve.run(app, name="scaling", route_prefix="/scaling")
    try:
        url = served + "/scaling"
        deadline = time.monotonic() + 90
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            while _replicas("scaling", "Solver") < 2 and time.monotonic() < deadline:
                list(
                    pool.map(lambda _: _post(url, {"problem": PROBLEM, "max_steps": 4}), range(16))
                )
        assert _replicas("scaling", "Solver") == 2
        assert _replicas("scaling", "Decomposer") == 1
    finally:
        serve.delete("scaling")


def test_killed_solver_replica_is_replaced_and_requests_keep_succeeding(served: str) -> None:
    import ray

    def solver_replicas() -> list[str]:
        return [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if "socratic#Solver" in a["name"]
        ]

    (name,) = solver_replicas()
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    for _ in range(3):
        status, raw = _post(served, {"problem": PROBLEM, "max_steps": 1})
        assert status == 200, raw
    (new_name,) = solver_replicas()
    assert new_name != name


def test_overload_answers_503_instead_of_queueing_for_ever(served: str, tiny_model_dir) -> None:
    import concurrent.futures

    from ray import serve

    from serve.app import build_app

    app = build_app({
        "decomposer": str(tiny_model_dir), "solver": str(tiny_model_dir), "max_new_tokens": 64,
        "num_threads": 1, "decomposer_options": SMALL, "solver_options": SMALL,
        "ingress_options": {"max_ongoing_requests": 1, "max_queued_requests": 1},
    })  # fmt: skip
    serve.run(app, name="tight", route_prefix="/tight")
    try:
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            codes = list(pool.map(
                lambda _: _post(served + "/tight", {"problem": PROBLEM, "max_steps": 3})[0],
                range(12)))  # fmt: skip
        assert set(codes) <= {200, 503}, codes
        assert codes.count(503) >= 1 and codes.count(200) >= 1, codes
    finally:
        serve.delete("tight")
