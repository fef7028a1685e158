"""The teacher client's error types, gates and shutdown, over real HTTP and without Ray.

Both HTTP clients (aiohttp, the default, and `--http-client openai`) must raise `TeacherError`s
and nothing else, the same type for the same failure, so that the callers (retries, rejected
rows, the run's stop) branch on types only. The errors cross process boundaries in Ray, so
they must pickle with their fields.
"""

from __future__ import annotations

import asyncio
import copy
import json
import pickle
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipelines.run_ledger import LedgerBook
from pipelines.teacher_client import (
    BudgetExhausted,
    ContentTeacherError,
    FatalTeacherError,
    LocalGate,
    Secret,
    TeacherClient,
    TeacherError,
    TransientTeacherError,
    prompt_token_bound,
    teacher_error,
)
from serve.fake_teacher import FaultPlan, TeacherServer
from socratic.adapters import DatasetSpec, load_problems

SAMPLE = list(load_problems(DatasetSpec("sample", split="all")))
CLIENTS = ["aiohttp", "openai"]


def _messages(i: int = 0) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Problem: {SAMPLE[i].question}"}]


def _client(base_url: str, http_client: str, **kw) -> TeacherClient:
    return TeacherClient(
        model="test-teacher",
        base_url=base_url,
        api_key=Secret("k"),
        http_client=http_client,
        timeout_s=kw.pop("timeout_s", 2.0),
        **kw,
    )


async def _raised(client: TeacherClient) -> BaseException | None:
    try:
        await client._create(_messages())
    except BaseException as e:  # noqa: BLE001 - what the client lets out is the point
        return e
    return None


# What each fault of the test teacher becomes: (type, kind, status).
FAULT_ERRORS = {
    "429": (TransientTeacherError, "429", 429),
    "500": (TransientTeacherError, "500", 500),
    "503": (TransientTeacherError, "503", 503),
    "400": (ContentTeacherError, "400", 400),
    "401": (FatalTeacherError, "401", 401),
    "403": (FatalTeacherError, "403", 403),
    "close": (TransientTeacherError, "connection", None),
    "slow": (TransientTeacherError, "timeout", None),
}


@pytest.mark.parametrize("http_client", CLIENTS)
def test_each_failure_of_a_real_endpoint_maps_to_one_teacher_error(http_client: str) -> None:
    async def go(server: TeacherServer) -> dict[str, BaseException | None]:
        got = {}
        for fault in FAULT_ERRORS:
            server.set_plan(FaultPlan(default=fault, retry_after_s=2.5, slow_s=2.0))
            client = _client(server.base_url, http_client, timeout_s=0.5)
            try:
                got[fault] = await _raised(client)
            finally:
                await client.close()
        return got

    with TeacherServer(SAMPLE) as server:
        got = asyncio.run(go(server))
    for fault, (cls, kind, status) in FAULT_ERRORS.items():
        e = got[fault]
        assert type(e) is cls, (fault, repr(e))
        assert (e.kind, e.status) == (kind, status), fault
    assert got["429"].retry_after == 2.5  # the Retry-After header, as a field
    assert got["500"].retry_after is None
    assert "(--api-key-env)" in str(got["401"])
    assert got["400"].reason.startswith("api_error: 400: Bad request.")


FILTERED = {
    "choices": [
        {
            "index": 0,
            "finish_reason": "content_filter",
            "message": {"role": "assistant", "content": None},
        }
    ],
    "usage": {"prompt_tokens": 1, "completion_tokens": 0},
}
# Replies no test teacher fault gives, by the request's model name: (status, body).
ODD_REPLIES = {
    "not-json": (200, b"<html>gateway says hello</html>"),
    "no-choices": (200, json.dumps({"id": "x", "usage": {}}).encode()),
    "filtered": (200, json.dumps(FILTERED).encode()),
    "gone": (404, json.dumps({"error": {"message": "The model does not exist."}}).encode()),
    "teapot": (418, b"short and stout"),
}


class _OddTeacher(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        status, body = ODD_REPLIES[request["model"]]
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("http_client", CLIENTS)
def test_replies_that_are_no_completion_are_content_errors(http_client: str) -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _OddTeacher)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    expect = {
        "not-json": (ContentTeacherError, "malformed_response"),
        "no-choices": (ContentTeacherError, "malformed_response"),
        "filtered": (ContentTeacherError, "content_filter"),
        "gone": (FatalTeacherError, "404"),
        "teapot": (ContentTeacherError, "418"),
    }

    async def go() -> dict[str, BaseException | None]:
        got = {}
        for model in expect:
            client = _client(url, http_client)
            client.model = model
            try:
                got[model] = await _raised(client)
            finally:
                await client.close()
        return got

    try:
        got = asyncio.run(go())
    finally:
        httpd.shutdown()
        httpd.server_close()
    for model, (cls, kind) in expect.items():
        assert type(got[model]) is cls and got[model].kind == kind, (model, repr(got[model]))
    assert "--model" in str(got["gone"])


def test_the_mapping_of_client_exceptions() -> None:
    import aiohttp
    import openai

    httpx = pytest.importorskip("httpx2")  # the openai client's transport here
    request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
    cases = [
        (aiohttp.ServerDisconnectedError(), TransientTeacherError, "connection"),
        (aiohttp.ClientConnectionError("refused"), TransientTeacherError, "connection"),
        (aiohttp.ServerTimeoutError("read"), TransientTeacherError, "timeout"),
        (asyncio.TimeoutError(), TransientTeacherError, "timeout"),
        (aiohttp.InvalidURL("nope://"), FatalTeacherError, "url"),
        (openai.APITimeoutError(request=request), TransientTeacherError, "timeout"),
        (openai.APIConnectionError(request=request), TransientTeacherError, "connection"),
        (ValueError("what"), ContentTeacherError, "ValueError"),
    ]
    for exc, cls, kind in cases:
        err = teacher_error(exc)
        assert type(err) is cls and err.kind == kind, (exc, err)
    same = TransientTeacherError("x", kind="503", status=503)
    assert teacher_error(same) is same


def test_teacher_errors_pickle_with_their_fields() -> None:
    from ray import cloudpickle

    errors = [
        FatalTeacherError("refused (401)", kind="401", status=401),
        TransientTeacherError("slow down", kind="429", status=429, retry_after=2.5),
        ContentTeacherError("filtered", kind="content_filter", status=200),
        BudgetExhausted("the cap"),
    ]
    for e in errors:
        for back in (pickle.loads(pickle.dumps(e)), cloudpickle.loads(cloudpickle.dumps(e)),
                     copy.copy(e)):  # fmt: skip
            assert type(back) is type(e) and back.__dict__ == e.__dict__ and str(back) == str(e)
            assert isinstance(back, TeacherError)
    assert isinstance(errors[3], FatalTeacherError)  # the cap stops the run's calls too


@pytest.mark.parametrize("http_client", CLIENTS)
def test_close_closes_the_session_and_its_connections(http_client: str) -> None:
    async def go(url: str) -> None:
        client = _client(url, http_client)
        assert (await client.complete(_messages())).error is None
        if http_client == "aiohttp":
            session = client._aiohttp._session
            connector = session.connector
            assert not session.closed and connector is not None
        else:
            inner = client._client
            assert not inner.is_closed()
        await client.close()
        if http_client == "aiohttp":
            assert session.closed and connector.closed
            assert client._aiohttp._session is None
        else:
            assert inner.is_closed()
        await client.close()  # twice is harmless

    with TeacherServer(SAMPLE) as server:
        asyncio.run(go(server.base_url))


def test_the_default_client_is_aiohttp_and_openai_is_not_built_for_it() -> None:
    client = TeacherClient(model="m", base_url="http://127.0.0.1:9/v1", api_key=Secret("k"))
    assert client._aiohttp is not None and client._client is None


def test_a_fatal_error_stops_the_clients_calls_and_the_cap_counts_calls_in_flight() -> None:
    async def go(server: TeacherServer) -> None:
        server.set_plan(FaultPlan(first=["401"]))
        client = _client(server.base_url, "aiohttp", max_in_flight=1)
        try:
            results = await asyncio.gather(
                *(client.complete(_messages(i)) for i in range(5)), return_exceptions=True
            )
        finally:
            await client.close()
        assert all(isinstance(r, FatalTeacherError) for r in results)
        assert server.stats()["requests"] == 1  # the others were never sent

    with TeacherServer(SAMPLE) as server:
        asyncio.run(go(server))

    async def gate() -> None:
        g = LocalGate(budget_usd=1.0)
        first = await g.admit(0.4)
        await g.admit(0.4)
        with pytest.raises(BudgetExhausted):
            await g.admit(0.4)  # 0.8 in flight at their bound + 0.4 > 1.0
        g.settle(first, 0.1, answered=True)
        await g.admit(0.4)  # 0.1 spent + 0.4 in flight + 0.4 fits

    asyncio.run(gate())


def test_the_prompt_bound_holds_for_the_test_teachers_count() -> None:
    from pipelines.prompting import Prompt

    for p in SAMPLE:  # the test teacher counts words: at most one per two bytes
        msgs = Prompt.default("socratic", p.answer_kind).messages(p, with_solution=True)
        assert prompt_token_bound(msgs) >= 2 * sum(len(m["content"].split()) for m in msgs)


def test_the_ledger_book_shares_the_cap_and_ignores_stale_reports() -> None:
    book = LedgerBook(cap_usd=10.0, probe_limit=4)
    a = book.reserve("a", need=1.0, want=8.0)
    assert a == 5.0  # half of the room to the first of one actor, not all 8
    b = book.reserve("b", need=1.0, want=8.0)
    assert b == pytest.approx(1.25)  # (10 - 5) / (2 x 2 actors)
    assert book.report("a", 0, spent_delta=3.0, held=2.0)  # spent 3, held 2
    assert book.room() == pytest.approx(10 - 3 - 2 - 1.25)
    assert book.reserve("b", need=4.0, want=4.0) == 0.0 and book.cap_reached  # 4 > 3.75
    assert book.reserve("b", need=3.0, want=4.0) == 3.0  # its need, above its share
    assert book.reserve("a", need=1.0, want=1.0) == 0.0  # 0.75 left
    book.end_chunk(spent_usd=3.5)
    assert (book.spent_usd, book.held, book.epoch) == (3.5, {}, 1)
    assert not book.report("a", 0, spent_delta=9.0, held=9.0)  # a chunk-0 actor's late report
    assert book.spent_usd == 3.5 and book.held == {}


def test_a_probe_slot_freed_by_a_fatal_error_is_never_taken_before_the_stop() -> None:
    # Ray runs an async actor's calls in no guaranteed order: the slot a 401 frees may arrive
    # before (or instead of) a separate `stop`. The freed slot carries the error, so a probe
    # waiting for it learns the stop rather than sending one call more than --max-in-flight.
    from pipelines.run_ledger import RunLedger

    async def scenario() -> tuple[str, FatalTeacherError | None]:
        ledger = RunLedger(cap_usd=None, probe_limit=1)
        assert (await ledger.probe())[0] == "slot"
        waiting = asyncio.create_task(ledger.probe())
        await asyncio.sleep(0.01)
        assert not waiting.done()  # the one slot is out, nothing known yet
        await ledger.end_probe(False, FatalTeacherError("refused", kind="401", status=401))
        return await asyncio.wait_for(waiting, 5)

    answer, stop = asyncio.run(scenario())
    assert answer == "stopped" and stop is not None and stop.status == 401
