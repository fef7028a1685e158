"""The stand-in teacher, exercised through the real `openai` client over real HTTP.

These tests pin what the annotation pipeline relies on: gold answers in the right format, and
each injected fault reaching the client as the exception class the pipeline will catch.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest

from serve.fake_teacher import (
    FALLBACK_QUESTION,
    MALFORMED,
    UNKNOWN_PROBLEM,
    FaultPlan,
    TeacherServer,
    wrong_answer,
)
from socratic.adapters import DatasetSpec, load_problems
from socratic.answers import extract_answer
from socratic.calculator import apply_calculator
from socratic.formats import parse_cot, parse_unified
from socratic.records import Problem, Step
from tests.support.paths import REPO

SOCRATIC_SYSTEM = "Break the problem into sub-questions. Write them as Q1: ... A1: ... lines."
COT_SYSTEM = "Solve the problem step by step and end with a line 'Answer: <number>'."


@pytest.fixture(scope="module")
def problems() -> list[Problem]:
    return list(load_problems(DatasetSpec("sample", split="all")))


@pytest.fixture
def server(problems: list[Problem]):
    with TeacherServer(problems) as srv:
        yield srv


def client_for(server: TeacherServer, timeout: float = 10.0, key: str = "test") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=timeout)


def ask(client: openai.OpenAI, problem: Problem, socratic: bool = True, **kwargs: Any):
    return client.chat.completions.create(
        model="teacher-x",
        messages=[
            {"role": "system", "content": SOCRATIC_SYSTEM if socratic else COT_SYSTEM},
            {"role": "user", "content": f"Problem: {problem.question}"},
        ],
        temperature=0.0,
        max_tokens=512,
        **kwargs,
    )


def content_of(response: Any) -> str:
    return response.choices[0].message.content


def http(server: TeacherServer, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
    root = server.base_url.removesuffix("/v1")
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(root + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# --- correct answers -------------------------------------------------------------------------


def test_socratic_reply_is_the_gold_steps_for_every_problem(server, problems):
    client = client_for(server)
    for p in problems:
        response = ask(client, p)
        assert parse_unified(content_of(response)) == list(p.steps), p.id
        assert response.model == "teacher-x"
        assert response.id.startswith("chatcmpl-")
        assert response.choices[0].finish_reason == "stop"
        usage = response.usage
        prompt_words = len(SOCRATIC_SYSTEM.split()) + len(f"Problem: {p.question}".split())
        assert usage.prompt_tokens == prompt_words
        assert usage.completion_tokens == len(content_of(response).split()) > 0
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    stats = server.stats()
    assert stats["requests"] == len(problems)
    assert stats["by_fault"] == {"ok": len(problems)}
    assert stats["by_status"] == {200: len(problems)}
    assert stats["by_problem"] == {p.id: 1 for p in problems}
    assert stats["auth_headers_seen"] == {"Bearer test"}


def test_cot_reply_ends_with_the_gold_answer(server, problems):
    p = problems[0]
    solution, answer = parse_cot(content_of(ask(client_for(server), p, socratic=False)))
    assert answer == p.answer
    assert solution == p.solution


def test_problem_found_by_its_line_in_a_longer_user_message(server, problems):
    p = problems[3]
    response = client_for(server).chat.completions.create(
        model="m",
        messages=[
            {"role": "system", "content": SOCRATIC_SYSTEM},
            {"role": "user", "content": "Problem: something else entirely"},
            {"role": "assistant", "content": "Q1: ?\nA1: ?"},
            {"role": "user", "content": f"Here it is.\nProblem:   {p.question}  \nThanks."},
        ],
    )
    assert parse_unified(content_of(response)) == list(p.steps)


def test_problem_without_steps_or_solution_still_gets_a_valid_reply():
    bare = Problem("x/test/0", "x", "test", "How many legs do 2 cats have?", "8")
    with TeacherServer([bare]) as srv:
        client = client_for(srv)
        steps = parse_unified(content_of(ask(client, bare)))
        assert steps == [Step(FALLBACK_QUESTION, "The answer is 8.")]
        assert parse_cot(content_of(ask(client, bare, socratic=False))) == (
            "The answer is 8.",
            "8",
        )


def test_unknown_problem_is_answered_and_counted(server):
    stranger = Problem("?/0", "?", "?", "What is the airspeed of an unladen swallow?", "11")
    assert content_of(ask(client_for(server), stranger)) == UNKNOWN_PROBLEM
    stats = server.stats()
    assert stats["unknown_problems"] == 1
    assert stats["by_problem"] == {}


# --- faults ----------------------------------------------------------------------------------

STATUS_FAULTS = [
    ("429", openai.RateLimitError, "rate_limit_exceeded"),
    ("500", openai.InternalServerError, None),
    ("503", openai.InternalServerError, "overloaded"),
    ("400", openai.BadRequestError, None),
    ("401", openai.AuthenticationError, "invalid_api_key"),
    ("403", openai.PermissionDeniedError, "permission_denied"),
]


@pytest.mark.parametrize(("fault", "error", "code"), STATUS_FAULTS)
def test_status_faults_raise_the_matching_openai_error(server, problems, fault, error, code):
    server.set_plan(FaultPlan(default=fault))
    with pytest.raises(error) as info:
        ask(client_for(server), problems[0])
    assert info.value.status_code == int(fault)
    assert info.value.code == code
    assert fault in info.value.message
    assert server.stats()["by_status"] == {int(fault): 1}


def test_429_carries_retry_after(server, problems):
    server.set_plan(FaultPlan(default="429", retry_after_s=2.5))
    with pytest.raises(openai.RateLimitError) as info:
        ask(client_for(server), problems[0])
    assert info.value.response.headers["retry-after"] == "2.5"

    server.set_plan(FaultPlan(default="429", retry_after_s=None))
    with pytest.raises(openai.RateLimitError) as info:
        ask(client_for(server), problems[0])
    assert "retry-after" not in info.value.response.headers


def test_slow_times_out_in_the_client(server, problems):
    server.set_plan(FaultPlan(default="slow", slow_s=2.0))
    start = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        ask(client_for(server, timeout=0.5), problems[0])
    assert time.monotonic() - start < 1.8


def test_close_is_a_connection_error_not_a_hang(server, problems):
    server.set_plan(FaultPlan(default="close"))
    start = time.monotonic()
    with pytest.raises(openai.APIConnectionError) as info:
        ask(client_for(server, timeout=10), problems[0])
    assert not isinstance(info.value, openai.APITimeoutError)
    assert time.monotonic() - start < 2
    stats = server.stats()
    assert stats["by_fault"] == {"close": 1}
    assert stats["by_status"] == {}


def test_wrong_keeps_the_format_but_changes_the_final_answer(server, problems):
    server.set_plan(FaultPlan(default="wrong"))
    client = client_for(server)
    for p in problems:
        steps = parse_unified(content_of(ask(client, p)))
        assert [s.question for s in steps] == [s.question for s in p.steps], p.id
        assert steps[:-1] == list(p.steps[:-1])
        last = steps[-1].answer
        # Wrong however the pipeline reads it: directly, or after recomputing annotations.
        assert extract_answer(last) == wrong_answer(p.answer) != p.answer, p.id
        assert extract_answer(apply_calculator(last).text) == wrong_answer(p.answer), p.id
        assert parse_cot(content_of(ask(client, p, socratic=False)))[1] == wrong_answer(p.answer)


def test_wrong_answer_swaps_yes_and_no():
    assert wrong_answer("yes") == "no" and wrong_answer("no") == "yes"
    assert wrong_answer("9.1") == "10.1"
    q = Problem("s/0", "strategyqa", "dev", "Do cats bark?", "no", steps=(Step("Q?", "No."),))
    with TeacherServer([q]) as srv:
        srv.set_plan(FaultPlan(default="wrong"))
        steps = parse_unified(content_of(ask(client_for(srv), q)))
    assert extract_answer(steps[-1].answer, "yesno") == "yes"


@pytest.mark.parametrize(("fault", "expected"), [("malformed", MALFORMED), ("empty", "")])
def test_malformed_and_empty_are_200_without_an_answer(server, problems, fault, expected):
    server.set_plan(FaultPlan(default=fault))
    content = content_of(ask(client_for(server), problems[0]))
    assert content == expected
    assert parse_unified(content) == []
    assert parse_cot(content)[1] is None


def test_per_problem_faults_are_consumed_in_order(server, problems):
    target, other = problems[0], problems[1]
    server.set_plan(FaultPlan(per_problem={target.id: ["500", "429", "wrong"]}))
    client = client_for(server)
    assert parse_unified(content_of(ask(client, other))) == list(other.steps)
    with pytest.raises(openai.InternalServerError):
        ask(client, target)
    with pytest.raises(openai.RateLimitError):
        ask(client, target)
    wrong = parse_unified(content_of(ask(client, target)))
    assert extract_answer(wrong[-1].answer) != target.answer
    assert parse_unified(content_of(ask(client, target))) == list(target.steps)  # plan used up
    stats = server.stats()
    assert stats["by_problem"] == {target.id: 4, other.id: 1}
    assert stats["by_fault"] == {"ok": 2, "500": 1, "429": 1, "wrong": 1}
    assert stats["by_status"] == {200: 3, 500: 1, 429: 1}


def test_first_applies_by_arrival_and_per_problem_takes_precedence(server, problems):
    a, b = problems[0], problems[1]
    server.set_plan(FaultPlan(first=["503", "503", "403"], per_problem={b.id: ["400"]}))
    client = client_for(server)
    with pytest.raises(openai.InternalServerError):
        ask(client, a)  # first[0]
    with pytest.raises(openai.BadRequestError):
        ask(client, b)  # per_problem beats first[1]
    with pytest.raises(openai.PermissionDeniedError):
        ask(client, a)  # first[2]
    assert content_of(ask(client, a))  # then the default


def outcomes(server: TeacherServer, problems: list[Problem], n: int) -> list[str]:
    client = client_for(server)
    seen = []
    for i in range(n):
        try:
            ask(client, problems[i % len(problems)])
            seen.append("ok")
        except openai.APIStatusError as e:
            seen.append(str(e.status_code))
    return seen


def test_rates_are_reproducible_with_a_seed(problems):
    plan = FaultPlan(rates={"500": 0.3, "429": 0.2})
    runs = []
    for seed in (7, 7, 8):
        with TeacherServer(problems, seed=seed) as srv:
            srv.set_plan(plan)
            runs.append(outcomes(srv, problems, 40))
            srv.set_plan(plan)  # a new plan replays from the seed
            assert outcomes(srv, problems, 40) == runs[-1]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert {"ok", "500", "429"} <= set(runs[0])


def test_fault_plan_validates_and_round_trips():
    plan = FaultPlan(
        default="wrong",
        rates={"429": 0.5},
        per_problem={"p": ["close", "ok"]},
        first=["slow"],
        retry_after_s=None,
        slow_s=0.1,
    )
    assert FaultPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    with pytest.raises(ValueError, match="unknown fault"):
        FaultPlan(default="boom")
    with pytest.raises(ValueError, match="sum to at most 1"):
        FaultPlan(rates={"500": 0.7, "429": 0.5})
    with pytest.raises(ValueError, match="unknown FaultPlan field"):
        FaultPlan.from_dict({"defualt": "500"})


# --- protocol --------------------------------------------------------------------------------


def test_api_key_is_checked(problems):
    with TeacherServer(problems, api_key="sk-right") as srv:
        with pytest.raises(openai.AuthenticationError) as info:
            ask(client_for(srv, key="sk-wrong"), problems[0])
        assert info.value.code == "invalid_api_key"
        assert info.value.type == "invalid_request_error"
        assert content_of(ask(client_for(srv, key="sk-right"), problems[0]))
        stats = srv.stats()
        assert stats["auth_headers_seen"] == {"Bearer sk-wrong", "Bearer sk-right"}
        assert stats["by_status"] == {401: 1, 200: 1}
        assert stats["by_fault"] == {"ok": 1}  # a refused key consumes no fault


def test_bad_requests_get_400_with_an_error_body(server, problems):
    status, body = http(server, "POST", "/v1/chat/completions", None)
    assert status == 400 and "not JSON" in body["error"]["message"]
    status, body = http(server, "POST", "/v1/chat/completions", {"model": "m"})
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="n=1"):
        ask(client_for(server), problems[0], n=2)


def test_models_endpoint(server):
    models = client_for(server).models.list()
    assert [m.id for m in models.data] == ["test-teacher"]


def test_concurrent_requests_are_served_in_parallel(problems):
    with TeacherServer(problems, latency_s=0.2) as srv:
        client = client_for(srv)
        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=64) as pool:
            replies = list(pool.map(lambda i: ask(client, problems[i % 40]), range(64)))
        elapsed = time.monotonic() - start
        assert elapsed < 5, f"64 requests took {elapsed:.1f} s; 64*0.2 s would be serial"
        for i, reply in enumerate(replies):
            assert parse_unified(content_of(reply)) == list(problems[i % 40].steps)
        assert srv.stats()["requests"] == 64
        assert len({r.id for r in replies}) == 64


def test_async_client_sees_mixed_faults_as_the_pipeline_will(problems):
    """The pipeline's own set-up: AsyncOpenAI, retries off, many requests in flight at once."""
    plan = FaultPlan(rates={"429": 0.2, "500": 0.2, "close": 0.1, "wrong": 0.1})
    with TeacherServer(problems, latency_s=0.05, seed=3) as srv:
        srv.set_plan(plan)

        async def one(client: openai.AsyncOpenAI, p: Problem) -> str:
            try:
                reply = await client.chat.completions.create(
                    model="m",
                    messages=[
                        {"role": "system", "content": SOCRATIC_SYSTEM},
                        {"role": "user", "content": f"Problem: {p.question}"},
                    ],
                )
            except openai.RateLimitError:
                return "429"
            except openai.InternalServerError:
                return "500"
            except openai.APIConnectionError as e:
                assert not isinstance(e, openai.APITimeoutError)
                return "close"
            steps = parse_unified(reply.choices[0].message.content)
            return "ok" if extract_answer(steps[-1].answer) == p.answer else "wrong"

        async def run_all() -> list[str]:
            client = openai.AsyncOpenAI(
                base_url=srv.base_url, api_key="test", max_retries=0, timeout=10
            )
            async with client:
                return await asyncio.gather(*(one(client, problems[i % 40]) for i in range(128)))

        start = time.monotonic()
        seen = asyncio.run(run_all())
        assert time.monotonic() - start < 5
        stats = srv.stats()
        assert stats["requests"] == 128
        assert {k: seen.count(k) for k in set(seen)} == stats["by_fault"]
        assert set(seen) == {"ok", "429", "500", "close", "wrong"}


def test_control_endpoints(server, problems):
    client = client_for(server)
    status, body = http(server, "POST", "/_control/plan", {"default": "503", "first": ["ok"]})
    assert status == 200 and body["plan"]["default"] == "503"
    assert content_of(ask(client, problems[0]))
    with pytest.raises(openai.InternalServerError):
        ask(client, problems[0])

    status, stats = http(server, "GET", "/_control/stats")
    assert status == 200
    assert stats["requests"] == 2
    assert stats["by_fault"] == {"ok": 1, "503": 1}
    assert stats["by_status"] == {"200": 1, "503": 1}
    assert stats["by_problem"] == {problems[0].id: 2}
    assert stats["auth_headers_seen"] == ["Bearer test"]

    status, body = http(server, "POST", "/_control/plan", {"default": "nope"})
    assert status == 400 and "unknown fault" in body["error"]["message"]

    assert http(server, "POST", "/_control/reset", {}) == (200, {"ok": True})
    assert http(server, "GET", "/_control/stats")[1]["requests"] == 0
    assert content_of(ask(client, problems[0]))  # reset restores the "ok" plan


def test_stop_refuses_new_connections(problems):
    srv = TeacherServer(problems).start()
    client = client_for(srv, timeout=2)
    assert content_of(ask(client, problems[0]))
    srv.stop()
    srv.stop()  # idempotent
    with pytest.raises(openai.APIConnectionError):
        ask(client, problems[0])


def test_cli_serves_until_sigterm(problems):
    env = {**os.environ, "TEACHER_KEY": "sk-cli"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve.fake_teacher", "--dataset", "sample"]
        + ["--split", "all", "--latency", "0.01", "--api-key-env", "TEACHER_KEY"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "the CLI printed no URL within 30 s"
        line = proc.stdout.readline().strip()
        assert line.startswith("TEACHER_SERVER_URL=http://127.0.0.1:")
        url = line.partition("=")[2]
        client = openai.OpenAI(base_url=url, api_key="sk-cli", max_retries=0, timeout=10)
        p = problems[5]
        assert parse_unified(content_of(ask(client, p))) == list(p.steps)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
