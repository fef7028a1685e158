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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


def _post(
    url: str,
    body: bytes | str | dict,
    timeout: float = 120,
    content_type: str | None = "application/json",
) -> tuple[int, bytes]:
    data = (
        body
        if isinstance(body, bytes)
        else (body.encode() if isinstance(body, str) else json.dumps(body).encode())
    )
    headers = {"Content-Type": content_type} if content_type else {}
    req = urllib.request.Request(f"{url}/solve", data=data, headers=headers)
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
    assert set(out) == {"answer", "steps", "timings", "truncated"}
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
    texts = [r.result().text for r in [handle.generate.remote(p) for p in prompts]]
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
        ({"problem": PROBLEM, "answer_kind": "maybe"}, 422, "'answer_kind' must be one of"),
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


# --- no bad input gets a 5xx: each class over real HTTP ----------------------------------------

GARBAGE = "\u202e\u200d" + "a\u0301\u0302\u0303\u05d0\u200f"  # RTL/ZWJ/combining/Hebrew


@pytest.mark.parametrize(
    ("body", "content_type", "status", "message"),
    [
        (json.dumps({"problem": PROBLEM}), "text/plain", 415, "must be application/json"),
        (json.dumps({"problem": PROBLEM}), None, 415, "must be application/json"),
        ("[" * 100_000 + "]" * 100_000, "application/json", 413, "limit is"),
        ('{"problem": ' + "[" * 1000 + "]" * 1000 + "}", "application/json", 400, "nested"),
        ('{"problem": "\\ud800 apples?"}', "application/json", 422, "unpaired surrogate"),
        (json.dumps({"problem": "apples \U0010ffff?"}), "application/json", 422, "U+10FFFF"),
        (json.dumps({"problem": "apples\x00?"}), "application/json", 422, "U+0000"),
        (b'{"problem": "\xff\xfe"}', "application/json", 400, "not valid JSON"),
    ],
    ids=["text-plain", "no-type", "deep-100k", "deep-1k", "surrogate", "nonchar", "nul",
         "bad-utf8"],
)  # fmt: skip
def test_bad_bodies_get_a_4xx_with_a_json_detail(
    served: str, body, content_type, status: int, message: str
) -> None:
    got, raw = _post(served, body, content_type=content_type)
    assert got == status, raw[:300]
    assert message in json.loads(raw)["detail"]


def test_short_unicode_garbage_is_answered(served: str) -> None:
    """Marks, joiners and bidi controls are text: within the model's positions they get a 200."""
    got, raw = _post(served, {"problem": GARBAGE * 3 + " How many?", "max_steps": 1})
    assert got == 200, raw


# The decomposer's prompt fits the tiny model's 512 positions; the solver's (problem + the
# problem's own long question, the fallback sub-question) does not.
LONG = "Ann has 3 bags of 4 apples. How many apples does she have after she buys " + ", ".join(
    ["2 more"] * 90
) + "?"


def _evaluated(model_dir: Path, problem: str, max_steps: int) -> dict:
    """The row offline evaluation writes for `problem`: its Ray Data actor, called in-process."""
    import pyarrow as pa

    from pipelines.evaluate import Evaluator

    dirs = {"decomposer": str(model_dir), "solver": str(model_dir)}
    ev = Evaluator("iterative", dirs, [True], max_steps, max_new_tokens=24, num_threads=1)
    row = {"id": "long", "dataset": "t", "split": "t", "question": problem, "answer": "3",
           "answer_kind": "number"}  # fmt: skip
    return ev(pa.Table.from_pylist([row])).to_pylist()[0]


@pytest.mark.parametrize("problem", [LONG, GARBAGE * 240], ids=["grows-past", "starts-past"])
def test_a_problem_past_the_positions_is_served_as_evaluation_scores_it(
    served: str, tiny_model_dir: Path, problem: str
) -> None:
    """Serve cuts a prompt as evaluation does (`bound_prompt`), so a problem whose solver prompt
    outgrows the model gets the evaluated answer and steps over HTTP, not a 413 mid-solve."""
    got, raw = _post(served, {"problem": problem, "max_steps": 4})
    assert got == 200, raw[:300]
    out = json.loads(raw)
    row = _evaluated(tiny_model_dir, problem, 4)
    assert out["truncated"] == row["truncated"] >= 1
    assert (out["answer"], out["steps"]) == (row["predicted"], row["steps"])
    got, raw = _post(served, {"problem": problem, "max_steps": 4, "stream": True})
    done = [b for b in raw.decode().split("\n\n") if b.strip()][-1].splitlines()
    assert done[0] == "event: done", raw[-300:]
    streamed = json.loads(done[1][len("data: ") :])
    assert (streamed["answer"], streamed["steps"]) == (out["answer"], out["steps"])


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(problem=st.text(min_size=1, max_size=300))
def test_any_text_gets_a_200_or_a_4xx_never_a_5xx(served: str, problem: str) -> None:
    got, raw = _post(served, json.dumps({"problem": problem, "max_steps": 1}))
    assert got == 200 or 400 <= got < 500, (got, raw[:300])
    if got != 200:
        assert json.loads(raw)["detail"]


def test_failures_inside_the_loop_map_to_503_to_retry_or_500_with_a_request_id() -> None:
    """The ingress's mapping, on the real exception types a handle call raises."""
    from ray.exceptions import ActorDiedError, RayTaskError
    from ray.serve.exceptions import BackPressureError

    from serve.app import failure

    assert failure(BackPressureError(num_queued_requests=9, max_queued_requests=8))[0] == 503
    assert failure(ActorDiedError())[0] == 503
    bug = RayTaskError("generate", "traceback", KeyError("x")).as_instanceof_cause()
    assert failure(bug, "req-7") == (
        500, "the models failed on this request (KeyError); request id req-7")  # fmt: skip
    assert failure(RuntimeError("boom"), "r1")[0] == 500


# --- answer kinds, metrics, the playground ----------------------------------------------------


def test_answer_kind_per_request_reads_the_answer_as_evaluation_does(served: str) -> None:
    from socratic.answers import extract_answer
    from socratic.formats import NO_ANSWER

    for kind in ("number", "yesno"):
        status, raw = _post(served, {"problem": PROBLEM, "max_steps": 2, "answer_kind": kind})
        assert status == 200, raw
        out = json.loads(raw)
        last = out["steps"][-1]["answer"]  # an unanswered step is no answer, not "no"
        assert out["answer"] == (None if last == NO_ANSWER else extract_answer(last, kind))


def test_batch_sizes_queue_waits_and_tokens_reach_prometheus(served: str) -> None:
    """Serve's metrics pipeline, as a Prometheus scrape sees it on the node's export port."""
    import time

    import ray

    assert _post(served, {"problem": PROBLEM, "max_steps": 1})[0] == 200
    port = ray.nodes()[0]["MetricsExportPort"]
    want = ("socratic_batch_size_bucket", "socratic_queue_wait_s_bucket",
            "socratic_generated_tokens")  # fmt: skip
    text, deadline = "", time.monotonic() + 90  # metrics are exported every few seconds
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        if all(w in text for w in want):
            break
        time.sleep(2)
    for w in want:
        assert w in text, w
    assert 'deployment="Decomposer"' in text and 'deployment="Solver"' in text


def _chromium() -> tuple[str, str] | None:
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def test_playground_page_shows_each_step_then_the_answer(served: str, tmp_path: Path) -> None:
    """A real headless Chromium types a problem into `GET /`, watches the steps arrive over
    the SSE stream, then the final answer; saves a screenshot."""
    import os

    found = _chromium()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have chromium + chromium-driver (.ci/run installs them)")
        pytest.skip("no chromium/chromedriver here: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = found
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1000,800"):  # fmt: skip
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        driver.get(served + "/")
        assert "socratic-distill" in driver.title
        box = driver.find_element(By.ID, "problem")
        box.send_keys(PROBLEM)
        driver.find_element(By.ID, "max_steps").clear()
        driver.find_element(By.ID, "max_steps").send_keys("3")
        driver.find_element(By.ID, "go").click()
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: d.find_element(By.ID, "answer").get_attribute("data-done") == "1"
                   or d.find_element(By.ID, "error").text)  # fmt: skip
        assert driver.find_element(By.ID, "error").text == ""
        steps = driver.find_elements(By.CSS_SELECTOR, "#steps li")
        assert steps and steps[0].find_element(By.CSS_SELECTOR, ".q").text.startswith("Q1: ")
        assert all(" s (at " in li.find_element(By.CSS_SELECTOR, ".t").text for li in steps)
        assert driver.find_element(By.ID, "answer").text.startswith("answer: ")
        shot = tmp_path / "playground.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 1000
        if os.environ.get("SOCRATIC_SCREENSHOT"):  # how docs/playground.png is made
            driver.save_screenshot(os.environ["SOCRATIC_SCREENSHOT"])
    finally:
        driver.quit()


def test_playground_is_one_static_page_with_no_outside_resources(served: str) -> None:
    with urllib.request.urlopen(served + "/", timeout=30) as r:
        assert r.headers["content-type"].startswith("text/html")
        page = r.read().decode()
    assert "<script" in page and 'fetch("solve"' in page  # relative: works under any prefix
    assert "http://" not in page and "https://" not in page  # no CDN, nothing fetched elsewhere


class _ScriptedModel:
    """A deployment handle's shape (`generate.remote(prompt)` awaited) over scripted texts; the
    solver takes `delay_s` per call so a step is still running when the client leaves."""

    def __init__(self, text: str, delay_s: float = 0.0) -> None:
        self.text, self.delay_s, self.calls = text, delay_s, 0
        self.generate = self

    async def remote(self, prompt: str):
        import asyncio

        from socratic.generate import Completion

        self.calls += 1
        await asyncio.sleep(self.delay_s)
        return Completion(self.text, 1, 1, "stop")


def test_a_stream_whose_client_leaves_stops_calling_the_models() -> None:
    """Starlette closes the event generator when the client disconnects; the solve it started
    must stop too, not run its remaining steps for nobody."""
    import asyncio

    from serve.app import Ingress

    questions = "\n".join(f"Q{k}: What is {k} + 1?" for k in range(1, 7))
    decomposer, solver = _ScriptedModel(questions), _ScriptedModel("A: 2", delay_s=0.2)
    plain = Ingress.func_or_class.__mro__[1]  # the class under @serve.ingress's ASGI wrapper
    ingress = plain(decomposer, solver)

    async def leave_after_first_step() -> None:
        events = ingress._events("What is 1 + 1?", {"max_steps": 6, "calculator": False})
        first = await events.__anext__()
        assert first.startswith("event: step")
        await events.aclose()  # what Starlette does when the client goes away
        await asyncio.sleep(1.0)  # five more steps' worth of time

    asyncio.run(leave_after_first_step())
    assert ingress.cancelled == 1
    assert solver.calls <= 2, solver.calls  # the step in flight at most, never all six
