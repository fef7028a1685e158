"""The annotation pipeline end to end: real Ray Data, real HTTP, the real `openai` client, real
Parquet read back with pyarrow. The teacher is the local fault-injecting server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from pipelines.annotate import AnnotateConfig, SpendRefused, run
from pipelines.teacher_client import FatalTeacherError
from serve.fake_teacher import FaultPlan, TeacherServer
from socratic.adapters import DatasetSpec, load_problems
from tests.support.annotations import read_annotation_rows, sample_config
from tests.support.paths import REPO, require_shared

SAMPLE = list(load_problems(DatasetSpec("sample", split="all")))
# Actors read the API key from their node's environment (never from their constructor
# arguments), so the keys these tests use are set before the session's Ray cluster starts:
# module import (collection) comes before any fixture.
SECRET = "sk-test-SECRET-7c1f"
os.environ["SOCRATIC_TEST_KEY"] = SECRET
os.environ["WRONG_KEY_FOR_TEST"] = "wrong-key"
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}


@pytest.fixture()
def teacher():
    with TeacherServer(SAMPLE) as server:
        yield server


def _cfg(tmp_path: Path, server: TeacherServer, **kw) -> AnnotateConfig:
    return sample_config(tmp_path, server, **kw)


def test_happy_path_writes_every_sample_accepted(ray_cluster, teacher, tmp_path) -> None:
    cfg = _cfg(tmp_path, teacher, samples=2, temperature=0.7, price_in=1.0, price_out=2.0)
    summary = run(cfg)
    rows = read_annotation_rows(cfg.output)
    assert len(rows) == 80
    assert Counter((r["id"], r["sample"]) for r in rows) == {
        (p.id, s): 1 for p in SAMPLE for s in (0, 1)
    }
    assert all(r["status"] == "accepted" and r["reason"] is None for r in rows)
    by_id = {p.id: p for p in SAMPLE}
    for r in rows:
        gold = by_id[r["id"]]
        assert [tuple(s.values()) for s in r["steps"]] == [
            (s.question, s.answer) for s in gold.steps
        ]
        assert r["predicted"] == gold.answer and r["attempts"] == 1
        assert r["teacher"] == "test-teacher" and r["prompt_version"] == "socratic-math-v1"
        assert r["prompt_tokens"] > 0 and r["completion_tokens"] > 0
    assert teacher.stats()["requests"] == 80
    on_disk = json.loads((Path(cfg.output) / "summary.json").read_text())
    assert on_disk == summary
    assert (summary["rows"], summary["accepted"], summary["rejected"]) == (80, 80, 0)
    assert (summary["missing_rows"], summary["duplicate_rows"], summary["retries"]) == (0, 0, 0)
    tokens = sum(r["prompt_tokens"] for r in rows), sum(r["completion_tokens"] for r in rows)
    assert (summary["prompt_tokens"], summary["completion_tokens"]) == tokens
    assert summary["cost_usd"] == pytest.approx((tokens[0] + 2 * tokens[1]) / 1e6)

    # A rerun into the same output calls the teacher for nothing.
    teacher.reset_stats()
    again = run(cfg)
    assert teacher.stats()["requests"] == 0
    assert (again["rows"], again["resumed_rows"], again["written_this_run"]) == (80, 80, 0)


@pytest.mark.parametrize("http_client", ["openai", "aiohttp"])
def test_each_fault_ends_as_a_retry_or_a_rejected_row_with_its_reason(
    ray_cluster, teacher, tmp_path, http_client
) -> None:
    p = [x.id for x in SAMPLE]
    teacher.set_plan(
        FaultPlan(
            retry_after_s=0.05,
            slow_s=3.0,
            per_problem={
                p[0]: ["429", "ok"],
                p[1]: ["500", "503", "ok"],
                p[2]: ["close", "ok"],
                p[3]: ["wrong"],
                p[4]: ["malformed"],
                p[5]: ["empty"],
                p[6]: ["400"],
                p[7]: ["slow", "slow", "slow"],
                p[8]: ["503"] * 3,
            },
        )
    )
    cfg = _cfg(tmp_path, teacher, limit=12, max_retries=2, timeout=1.0, http_client=http_client)
    summary = run(cfg)
    rows = {r["id"]: r for r in read_annotation_rows(cfg.output)}
    assert len(rows) == 12
    expect = {
        p[0]: ("accepted", None, 2),
        p[1]: ("accepted", None, 3),
        p[2]: ("accepted", None, 2),
        p[3]: ("rejected", "wrong_answer", 1),
        p[4]: ("rejected", "unparseable", 1),
        p[5]: ("rejected", "empty_response", 1),
        p[6]: ("rejected", "api_error: 400", 1),
        p[7]: ("rejected", "api_error: timeout", 3),
        p[8]: ("rejected", "api_error: 503", 3),
    }
    for pid, (status, reason, attempts) in expect.items():
        r = rows[pid]
        got_reason = r["reason"] if r["reason"] is None else ": ".join(r["reason"].split(": ")[:2])
        assert (r["status"], got_reason, r["attempts"]) == (status, reason, attempts), pid
    assert rows[p[3]]["predicted"] != SAMPLE[3].answer and rows[p[3]]["raw"]
    assert summary["rejected_by_reason"] == {
        "wrong_answer": 1,
        "unparseable": 1,
        "empty_response": 1,
        "api_error: 400": 1,
        "api_error: timeout": 1,
        "api_error: 503": 1,
    }
    assert summary["retries"] == 1 + 2 + 1 + 2 + 2
    assert summary["teacher_calls"] == teacher.stats()["requests"]

    # Rerun: only the two transient failures are asked again; nothing ends up twice.
    teacher.reset_stats()
    teacher.set_plan(FaultPlan())
    again = run(cfg)
    assert teacher.stats()["by_problem"] == {p[7]: 1, p[8]: 1}
    assert again["transient_rows_retried"] == 2
    rows = read_annotation_rows(cfg.output)
    assert Counter(r["id"] for r in rows) == {x: 1 for x in p[:12]}
    assert {r["id"]: r["status"] for r in rows}[p[8]] == "accepted"
    assert again["rejected_by_reason"] == {
        "wrong_answer": 1,
        "unparseable": 1,
        "empty_response": 1,
        "api_error: 400": 1,
    }


def test_refused_key_stops_the_job_with_a_clear_message(ray_cluster, tmp_path) -> None:
    with TeacherServer(SAMPLE, api_key="right-key") as server:
        cfg = _cfg(tmp_path, server, api_key_env="WRONG_KEY_FOR_TEST", limit=4)
        with pytest.raises(FatalTeacherError, match=r"refused the request \(401\)"):
            run(cfg)
        assert server.stats()["requests"] <= 4


def test_cli_reports_a_missing_key_and_documents_every_flag() -> None:
    out = subprocess.run(
        [sys.executable, "pipelines/annotate.py", "--help"],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in [
        "--dataset",
        "--output",
        "--split",
        "--limit",
        "--model",
        "--base-url",
        "--api-key-env",
        "--style",
        "--samples",
        "--temperature",
        "--max-in-flight",
        "--rpm",
        "--tpm",
        "--with-gold-solution",
        "--mode",
        "--price-in",
        "--price-out",
    ]:
        assert flag in out, flag
    env = {k: v for k, v in ENV.items() if k != "NO_SUCH_KEY"}
    proc = subprocess.run(
        [
            sys.executable,
            "pipelines/annotate.py",
            "--dataset",
            "sample",
            "--output",
            "/tmp/unused",
            "--api-key-env",
            "NO_SUCH_KEY",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "$NO_SUCH_KEY is not set" in proc.stderr


def test_secret_never_reaches_parquet_summary_or_logs(ray_cluster, tmp_path, capfd) -> None:
    secret = SECRET
    with TeacherServer(SAMPLE, api_key=secret) as server:
        cfg = _cfg(tmp_path, server, api_key_env="SOCRATIC_TEST_KEY", limit=5)
        summary = run(cfg)
        assert summary["accepted"] == 5
        assert server.stats()["auth_headers_seen"] == {f"Bearer {secret}"}
    for path in Path(cfg.output).rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    out, err = capfd.readouterr()
    assert secret not in out and secret not in err
    logs = Path(ray_cluster.address_info["session_dir"]) / "logs"
    for path in logs.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert secret.encode() not in path.read_bytes(), path


@pytest.mark.shared_data
def test_gold_mode_on_the_real_gsm8k_socratic_file(ray_cluster, tmp_path) -> None:
    path = require_shared("gsm8k/test_socratic.jsonl")
    cfg = AnnotateConfig(
        dataset="gsm8k",
        split="test",
        path=str(path),
        mode="gold",
        output=str(tmp_path / "gold"),
        max_in_flight=256,
    )
    summary = run(cfg)
    rows = read_annotation_rows(cfg.output)
    assert len(rows) == summary["rows"] == 1319
    assert all(r["teacher"] == "gold" and r["attempts"] == 0 and r["steps"] for r in rows)
    assert summary["accepted"] == 1307  # the gold steps whose last step carries the #### answer
    assert summary["rejected_by_reason"] == {"wrong_answer": 12}
    print(
        f"\ngold mode gsm8k/test: {summary['accepted']} accepted, {summary['rejected']} "
        f"rejected, {summary['wall_s']} s"
    )


def _journal_lines(out: Path) -> int:
    return sum(
        f.read_bytes().count(b"\n") for f in (out / "_journal").glob("*.jsonl") if f.is_file()
    )


def _wait_until_quiet(server: TeacherServer) -> None:
    """The killed job's workers notice their raylet is gone within a few seconds; calls they
    still had in flight are theirs, not the rerun's: wait until the server hears no more."""
    seen, quiet_since = -1, time.monotonic()
    while time.monotonic() - quiet_since < 3:
        if server.stats()["requests"] != seen:
            seen, quiet_since = server.stats()["requests"], time.monotonic()
        time.sleep(0.2)


@pytest.mark.slow
def test_killed_run_loses_at_most_the_calls_in_flight(tmp_path) -> None:
    """SIGKILL the job (its own local Ray cluster) mid-run, then rerun into the same output.

    Every answer the teacher delivered is in the journal at once, so the rerun asks again only
    for the calls that were still in flight (at most --max-in-flight), never for an answered one.
    Before the journal, Ray Data held rows until a whole block was written: the rerun paid again
    for every answer of the unwritten blocks.
    """
    in_flight = 2
    with TeacherServer(SAMPLE, latency_s=0.25) as server:
        out = tmp_path / "out"
        args = [
            sys.executable, "pipelines/annotate.py", "--dataset", "sample", "--split", "all",
            "--output", str(out), "--base-url", server.base_url, "--model", "test-teacher",
            "--max-in-flight", str(in_flight), "--address", "local",
        ]  # fmt: skip
        proc = subprocess.Popen(
            args,
            cwd=REPO,
            env=ENV,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and _journal_lines(out) < 5:
                assert proc.poll() is None, "annotate finished before it could be killed"
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _wait_until_quiet(server)
        called_before = set(server.stats()["by_problem"])
        assert 5 <= len(called_before) < 40, len(called_before)

        server.reset_stats()
        rerun = [*args[:-4], "--max-in-flight", "16", *args[-2:]]  # only the kill needs 2
        result = subprocess.run(rerun, cwd=REPO, env=ENV, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        rerun_calls = server.stats()["by_problem"]

    rows = read_annotation_rows(str(out))
    assert Counter(r["id"] for r in rows) == {p.id: 1 for p in SAMPLE}
    assert all(n == 1 for n in rerun_calls.values()), rerun_calls
    paid_twice = set(rerun_calls) & called_before
    assert len(paid_twice) <= in_flight, sorted(paid_twice)
    assert set(rerun_calls) | called_before == {p.id for p in SAMPLE}
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["rows"], summary["missing_rows"], summary["duplicate_rows"]) == (40, 0, 0)
    assert summary["journal_rows_recovered"] >= len(called_before) - in_flight
    assert not list((out / "_journal").glob("*.jsonl")), "the journal outlived its compaction"
    print(
        f"\nkilled after {len(called_before)} problems were called; the rerun asked again for "
        f"{len(paid_twice)} of them (in flight at the kill: at most {in_flight})"
    )


@pytest.mark.parametrize("http_client", ["openai", "aiohttp"])
def test_a_wrong_key_costs_at_most_max_in_flight_calls(ray_cluster, tmp_path, http_client) -> None:
    with TeacherServer(SAMPLE, api_key="right-key") as server:
        cfg = _cfg(
            tmp_path,
            server,
            api_key_env="WRONG_KEY_FOR_TEST",
            max_in_flight=2,
            http_client=http_client,
        )
        with pytest.raises(FatalTeacherError, match=r"refused the request \(401\)"):
            run(cfg)
        assert 1 <= server.stats()["requests"] <= 2, server.stats()["requests"]


def test_the_key_comes_from_the_nodes_environment_not_the_actors_arguments(
    ray_cluster, tmp_path
) -> None:
    from ray import cloudpickle

    from pipelines.annotate import annotator_kwargs

    cfg = _cfg(tmp_path, TeacherServer(SAMPLE), api_key_env="SOCRATIC_TEST_KEY")
    assert SECRET.encode() not in cloudpickle.dumps(annotator_kwargs(cfg, None))
    # Set in the driver only, after the cluster's nodes started: the actors do not see it.
    os.environ["KEY_SET_AFTER_RAY_STARTED"] = "sk-late"
    cfg = AnnotateConfig(
        dataset="sample",
        split="all",
        output=str(tmp_path / "late"),
        limit=2,
        api_key_env="KEY_SET_AFTER_RAY_STARTED",
    )
    with pytest.raises(FatalTeacherError, match=r"KEY_SET_AFTER_RAY_STARTED is not set on this"):
        run(cfg)


def test_dry_run_and_a_refused_estimate_call_nothing(ray_cluster, teacher, tmp_path, capsys):
    cfg = _cfg(tmp_path, teacher, dry_run=True, price_in=1.0, price_out=2.0, max_tokens=100)
    summary = run(cfg)
    est = summary["estimate"]
    assert summary["dry_run"] and est["calls"] == 40 and est["completion_tokens"] == 4000
    assert est["prompt_tokens"] > 40 * 100
    assert est["cost_usd"] == pytest.approx((est["prompt_tokens"] + 2 * 4000) / 1e6)
    # No tiktoken encoding offline / for this model name: the count says it is approximate.
    assert est["prompt_tokens_by"].startswith("approximation")
    assert "estimate: 40 teacher calls" in capsys.readouterr().out
    with pytest.raises(SpendRefused, match="above --max-cost-usd"):
        run(_cfg(tmp_path, teacher, price_in=1.0, price_out=2.0, max_cost_usd=0.001))
    assert teacher.stats()["requests"] == 0


def test_spend_cap_stops_cleanly_and_the_rerun_finishes(ray_cluster, teacher, tmp_path) -> None:
    # The estimate counts --max-tokens 8 per reply; the teacher writes far more, so real spend
    # reaches the cap (the estimate itself) well before the end.
    price = dict(price_in=0.0, price_out=1000.0, max_tokens=8, max_in_flight=2)
    estimate = run(_cfg(tmp_path, teacher, dry_run=True, **price))["estimate"]["cost_usd"]
    cfg = _cfg(tmp_path, teacher, max_cost_usd=estimate, **price)
    summary = run(cfg)
    assert summary["stopped"] and "--max-cost-usd" in summary["stopped"]
    assert 0 < summary["rows"] < 40 and summary["missing_rows"] == 40 - summary["rows"]
    # A call starts only while spent + the calls in flight at their bound (8 tokens here) + its
    # own bound fit: the run stops within 4 bounds of the cap ...
    bound = 8 * 1000.0 / 1e6
    assert summary["cost_usd"] > estimate - 4 * bound
    # ... and overshoots it only because this teacher writes past --max-tokens (a real endpoint
    # does not): by the replies of the calls in flight.
    biggest = max(r["completion_tokens"] for r in read_annotation_rows(cfg.output)) * 1000.0 / 1e6
    assert summary["cost_usd"] < estimate + 2 * biggest
    assert teacher.stats()["requests"] == summary["rows"]
    teacher.reset_stats()
    again = run(_cfg(tmp_path, teacher, **price))
    assert (again["rows"], again["missing_rows"], again["stopped"]) == (40, 0, None)
    assert teacher.stats()["requests"] == 40 - summary["rows"]


def test_a_first_wave_estimates_from_real_replies_and_its_revision_decides(
    ray_cluster, teacher, tmp_path, capsys
) -> None:
    # --max-tokens 512 bounds the replies at 10x what the teacher writes: the bound alone is
    # refused by a cap the real spend fits in, and a first wave measures that.
    price = dict(price_in=0.0, price_out=1000.0, max_tokens=512)
    bound = run(_cfg(tmp_path, teacher, dry_run=True, **price))["estimate"]["cost_usd"]
    with pytest.raises(SpendRefused, match="--estimate-wave"):
        run(_cfg(tmp_path, teacher, max_cost_usd=bound / 2, **price))
    assert teacher.stats()["requests"] == 0
    summary = run(_cfg(tmp_path, teacher, max_cost_usd=bound / 2, estimate_wave=8, **price))
    revised = summary["estimate"]["revised"]
    assert (summary["rows"], summary["stopped"], teacher.stats()["requests"]) == (40, None, 40)
    assert (revised["wave_calls"], revised["wave_answered"], revised["rest_calls"]) == (8, 8, 32)
    assert revised["mean_completion_tokens"] < 512 / 4
    assert summary["revised_cost_usd"] == revised["cost_usd"]
    assert revised["cost_usd"] == pytest.approx(summary["cost_usd"], rel=0.35)
    assert "estimate after a first wave of 8 calls" in capsys.readouterr().out

    # A cap the wave fits in but the revised estimate does not: the run stops after the wave,
    # resumable, and the rerun pays only for the rest.
    teacher.reset_stats()
    mean = revised["mean_completion_tokens"]
    price["max_tokens"] = int(2 * mean) + 1  # wave bound: 4 x 2 means; the whole: ~40 means
    out = dict(output=str(tmp_path / "capped"), **price)
    cap = 20 * mean * 1000.0 / 1e6
    stopped = run(_cfg(tmp_path, teacher, max_cost_usd=cap, estimate_wave=4, **out))
    assert "after the first wave" in stopped["stopped"]
    assert (stopped["rows"], stopped["missing_rows"], teacher.stats()["requests"]) == (4, 36, 4)
    assert stopped["revised_cost_usd"] > cap
    teacher.reset_stats()
    again = run(_cfg(tmp_path, teacher, **out))
    assert (again["rows"], again["missing_rows"], teacher.stats()["requests"]) == (40, 0, 36)


def test_step_checks_and_repeated_decompositions(ray_cluster, teacher, tmp_path) -> None:
    pid = SAMPLE[0].id
    teacher.set_plan(FaultPlan(per_problem={pid: ["wrong_step"]}))
    cfg = _cfg(tmp_path, teacher, limit=4, samples=2)
    summary = run(cfg)
    rows = read_annotation_rows(cfg.output)
    bad = [r for r in rows if r["step_check"] == "wrong"]
    assert len(bad) == 1 and bad[0]["id"] == pid
    assert (bad[0]["status"], bad[0]["reason"]) == ("rejected", "wrong_step")
    assert bad[0]["predicted"] == SAMPLE[0].answer  # the final answer alone would have passed
    assert summary["rejected_by_reason"] == {"wrong_step": 1}
    assert summary["step_check"] == {"ok": 7, "wrong": 1}
    # Temperature 0, two samples: every problem's two decompositions are the same one.
    assert summary["repeated_decompositions"] == 4
    assert any("--temperature 0" in w for w in summary["warnings"])

    teacher.set_plan(FaultPlan(per_problem={pid: ["wrong_step"]}))
    repair = _cfg(tmp_path, teacher, limit=1, step_check="repair", output=str(tmp_path / "r"))
    summary = run(repair)
    (row,) = read_annotation_rows(repair.output)
    assert (row["status"], row["step_check"], summary["step_check"]) == (
        "accepted",
        "repaired",
        {"repaired": 1},
    )
    assert [s["answer"] for s in row["steps"]] == [s.answer for s in SAMPLE[0].steps]


def test_an_output_written_before_the_newer_columns_resumes_and_trains(ray_cluster, tmp_path):
    """Parquet from before `step_check` / `decomposition` is migrated on resume (nulls there),
    the rerun adds only the problems it lacks, and the trainer's reader takes both kinds."""
    import pyarrow.parquet as pq

    from socratic.records import ADDED_COLUMNS
    from trainers.data import read_accepted

    out = tmp_path / "gold"
    cfg = AnnotateConfig(dataset="sample", split="all", mode="gold", output=str(out), limit=10)
    run(cfg)
    for f in out.rglob("*.parquet"):  # make it what an older release wrote
        pq.write_table(pq.read_table(f).drop_columns(list(ADDED_COLUMNS)), f)
    old = read_accepted(str(out))
    assert len(old) == 10 and all(r["step_check"] is None for r in old)

    summary = run(AnnotateConfig(dataset="sample", split="all", mode="gold", output=str(out)))
    assert (summary["rows"], summary["missing_rows"], summary["duplicate_rows"]) == (40, 0, 0)
    rows = read_annotation_rows(str(out))
    assert Counter(r["id"] for r in rows) == {p.id: 1 for p in SAMPLE}
    assert sum(r["decomposition"] is None for r in rows) == 10  # the old rows, kept as they were
    assert len(read_accepted(str(out))) == summary["accepted"]


def test_the_summary_counts_the_same_whatever_it_reads_at_once(ray_cluster, teacher, tmp_path):
    """`summarize` reads the output a group of files at a time (driver memory); a rerun that
    reads one file at a time must count exactly what one read of everything counts."""
    from pipelines import summary  # where `summarize` reads the constant, so patch it there

    cfg = _cfg(tmp_path, teacher, samples=2, temperature=0.7, max_in_flight=4)
    first = run(cfg)
    assert len(list(Path(cfg.output).rglob("*.parquet"))) > 1
    whole = run(cfg)  # a rerun: every row resumed, nothing called
    group, summary.SUMMARY_GROUP_ROWS = summary.SUMMARY_GROUP_ROWS, 1
    try:
        piecewise = run(cfg)
    finally:
        summary.SUMMARY_GROUP_ROWS = group
    volatile = {"wall_s", "rows_per_s", "estimate", "warnings"}
    assert {k: v for k, v in piecewise.items() if k not in volatile} == {
        k: v for k, v in whole.items() if k not in volatile
    }
    assert whole["rows"] == first["rows"] == 80 and whole["resumed_rows"] == 80


def test_many_in_flight_on_the_openai_client_gets_a_hint(teacher, tmp_path, caplog) -> None:
    """At 256+ in flight the openai client's CPU bounds an actor: the run says what goes further."""
    caplog.set_level("WARNING", logger="annotate")
    run(_cfg(tmp_path, teacher, max_in_flight=512, http_client="openai", dry_run=True))
    assert "--http-client aiohttp" in caplog.text
    caplog.clear()
    run(_cfg(tmp_path, teacher, max_in_flight=512, dry_run=True))  # aiohttp, the default
    run(_cfg(tmp_path, teacher, max_in_flight=64, http_client="openai", dry_run=True))
    assert "--http-client aiohttp" not in caplog.text
