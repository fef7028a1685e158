"""`annotate.py --batch-api` end to end: the real `openai` client against the local teacher
server's files and batches endpoints over real HTTP, rows read back from real Parquet.

No Ray here: batch mode runs in the driver. The online rows it is compared with come from the
online path's own actor class (`TeacherAnnotator`), called in-process on the same items.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import openai
import pyarrow as pa
import pytest

from pipelines.annotate import (
    AnnotateConfig,
    SpendRefused,
    TeacherAnnotator,
    format_summary,
    iter_work_items,
    output_fs,
    run,
)
from pipelines.batch_api import BatchRunner, chunk_requests, request_line
from pipelines.teacher_client import FatalTeacherError
from serve.fake_teacher import FaultPlan, TeacherServer
from socratic.adapters import DatasetSpec, load_problems
from tests.support.annotations import read_annotation_rows, sample_config
from tests.support.paths import REPO

SAMPLE = list(load_problems(DatasetSpec("sample", split="all")))
IDS = [p.id for p in SAMPLE]
os.environ.setdefault("WRONG_KEY_FOR_BATCH_TEST", "wrong-key")
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
COMPARED = ("status", "reason", "predicted", "steps", "step_check", "decomposition", "raw")
COMPARED += ("prompt_tokens", "completion_tokens", "attempts", "teacher", "prompt_version")


@pytest.fixture()
def teacher():
    with TeacherServer(SAMPLE) as server:
        yield server


def _cfg(tmp_path: Path, server: TeacherServer, **kw) -> AnnotateConfig:
    return sample_config(tmp_path, server, **{"limit": 8, "batch_api": True,
                                               "batch_poll_s": 0.05, **kw})  # fmt: skip


def _records(output: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((Path(output) / "_batches").glob("*.json"))]


def _batch_files(output: str) -> list[str]:
    return sorted(p.name for p in (Path(output) / "_batches").iterdir())


def _online_rows(cfg: AnnotateConfig) -> dict[str, dict]:
    """What the online path writes for the same items (its actor class, without Ray Data)."""
    items = [item for item, _ in iter_work_items(cfg, load_problems(DatasetSpec.from_config(cfg)))]

    async def call() -> pa.Table:
        annotator = TeacherAnnotator(cfg)
        try:
            return await annotator(pa.Table.from_pylist(items))
        finally:
            annotator.journal.close()
            await annotator.client.close()

    return {r["cache_key"]: r for r in asyncio.run(call()).to_pylist()}


def test_batch_rows_are_the_online_rows_at_half_the_estimated_price(teacher, tmp_path) -> None:
    plan = FaultPlan(per_problem={IDS[1]: ["wrong"], IDS[2]: ["wrong_step"], IDS[3]: ["malformed"]})
    prices = dict(price_in=1.0, price_out=2.0)
    teacher.set_plan(plan)
    online_cfg = _cfg(tmp_path, teacher, batch_api=False, output=str(tmp_path / "online"))
    online = _online_rows(online_cfg)
    assert len(online) == 8

    online_estimate = run(_cfg(tmp_path, teacher, batch_api=False, dry_run=True, **prices))
    batch_estimate = run(_cfg(tmp_path, teacher, dry_run=True, **prices))
    assert batch_estimate["estimate"]["cost_usd"] == pytest.approx(
        online_estimate["estimate"]["cost_usd"] / 2, abs=2e-6
    )
    assert batch_estimate["estimate"]["pricing"] == "Batch API price, x0.5"

    teacher.set_plan(plan)
    teacher.reset_stats()
    cfg = _cfg(tmp_path, teacher, **prices)
    summary = run(cfg)
    rows = {r["cache_key"]: r for r in read_annotation_rows(cfg.output)}
    assert rows.keys() == online.keys()
    for key, row in rows.items():
        assert {k: row[k] for k in COMPARED} == {k: online[key][k] for k in COMPARED}, row["id"]
    by_id = {r["id"]: r for r in rows.values()}
    assert (by_id[IDS[1]]["reason"], by_id[IDS[2]]["reason"]) == ("wrong_answer", "wrong_step")
    assert by_id[IDS[3]]["reason"] == "unparseable"

    stats = teacher.stats()
    assert (stats["requests"], stats["batch_requests"], stats["batches_created"]) == (8, 8, 1)
    assert (summary["rows"], summary["accepted"], summary["rejected"]) == (8, 5, 3)
    assert (summary["missing_rows"], summary["duplicate_rows"], summary["teacher_calls"]) == (
        0,
        0,
        8,
    )
    tokens = (
        sum(r["prompt_tokens"] for r in rows.values()),
        sum(r["completion_tokens"] for r in rows.values()),
    )
    assert summary["cost_usd"] == pytest.approx((tokens[0] + 2 * tokens[1]) / 1e6 / 2, abs=1e-6)
    batches = summary["batches"]
    assert (batches["batches"], batches["new"], batches["requests"]) == (1, 1, 8)
    assert batches["by_status"] == {"completed": 1} and batches["still_running"] == []
    (record,) = _records(cfg.output)
    assert record["state"] == "collected" and record["batch_id"] == batches["ids"][0]
    assert record["collected"]["rows"] == 8 and record["input_file_id"]
    assert "Batch API: 1 batches" in format_summary(summary)
    # Collected: its record is all that is left in _batches/, and nothing at the provider.
    assert _batch_files(cfg.output) == [f"{record['name']}.json"]
    assert teacher.files() == {} and batches["provider_files_deleted"] == 2  # input, output
    assert "2 files deleted at the provider" in format_summary(summary)

    teacher.reset_stats()
    again = run(cfg)
    assert teacher.stats()["requests"] == 0 and teacher.stats()["files_uploaded"] == 0
    assert (again["rows"], again["resumed_rows"], again["batches"]["batches"]) == (8, 8, 0)


def test_collected_batch_files_are_kept_on_request_and_pruned_by_the_next_run(
    teacher, tmp_path
) -> None:
    cfg = _cfg(tmp_path, teacher, batch_keep_files=True)
    run(cfg)
    (record,) = _records(cfg.output)
    name = record["name"]
    suffixes = (".items.arrow", ".json", ".jsonl", ".output.jsonl")
    assert _batch_files(cfg.output) == sorted(name + s for s in suffixes)
    # What was uploaded (kept at the provider too) is exactly the online request, line by line.
    client = openai.OpenAI(base_url=teacher.base_url, api_key="x", max_retries=0)
    uploaded = client.files.content(record["input_file_id"]).read()
    assert uploaded == (Path(cfg.output) / "_batches" / f"{name}.jsonl").read_bytes()
    assert uploaded.count(b"\n") == 8 and json.loads(uploaded.splitlines()[0])["body"]["model"]
    assert set(teacher.files()) == {record["input_file_id"], record["output_file_id"]}
    # As a run killed between "collected" and the prune leaves it: the next run prunes it, and
    # pays for nothing.
    teacher.reset_stats()
    again = run(replace(cfg, batch_keep_files=False))
    assert _batch_files(cfg.output) == [f"{name}.json"]
    assert teacher.stats()["requests"] == 0 and again["rows"] == 8


def test_a_provider_that_will_not_delete_files_leaves_them_with_a_warning(
    teacher, tmp_path, caplog
) -> None:
    teacher.set_plan(FaultPlan(file_deletes_fail=True))
    cfg = _cfg(tmp_path, teacher)
    summary = run(cfg)
    assert (summary["rows"], summary["batches"]["provider_files_deleted"]) == (8, 0)
    (record,) = _records(cfg.output)
    assert set(teacher.files()) == {record["input_file_id"], record["output_file_id"]}
    assert caplog.text.count("it stays there") == 2
    assert _batch_files(cfg.output) == [f"{record['name']}.json"]  # ours are gone all the same


def test_a_run_that_stops_waiting_leaves_its_batch_to_the_rerun_which_pays_nothing_twice(
    teacher, tmp_path
) -> None:
    teacher.set_plan(FaultPlan(batch_polls=10**6))  # answers a line per poll, never finishes
    cfg = _cfg(tmp_path, teacher, batch_max_wait_s=0.3)
    first = run(cfg)
    assert first["stopped"] and "--batch-max-wait-s" in first["stopped"]
    (batch_id,) = first["batches"]["still_running"]
    assert first["missing_rows"] == 8 and "still running" in format_summary(first)
    (record,) = _records(cfg.output)
    assert (record["state"], record["batch_id"]) == ("submitted", batch_id)
    answered_before = teacher.stats()["requests"]
    assert 1 <= answered_before < 8

    teacher.set_plan(FaultPlan(batch_polls=0))
    second = run(_cfg(tmp_path, teacher))
    assert second["batches"]["resumed"] == 1 and second["batches"]["new"] == 0
    assert second["batches"]["ids"] == [batch_id]
    assert (second["rows"], second["missing_rows"], second["written_this_run"]) == (8, 0, 8)
    stats = teacher.stats()  # both runs
    assert stats["batches_created"] == 1 and stats["files_uploaded"] == 1
    assert stats["by_problem"] == {i: 1 for i in IDS[:8]}  # every request paid once
    assert Counter(r["id"] for r in read_annotation_rows(cfg.output)) == {i: 1 for i in IDS[:8]}


@pytest.mark.parametrize("created", [False, True], ids=["never-created", "created-unrecorded"])
def test_a_kill_between_upload_and_create_makes_exactly_one_batch(
    teacher, tmp_path, created
) -> None:
    cfg = _cfg(tmp_path, teacher)
    fs, root = output_fs(cfg.output)
    runner = BatchRunner(cfg, fs, root)
    items = iter_work_items(cfg, load_problems(DatasetSpec.from_config(cfg)))
    chunks = chunk_requests(cfg, runner.store, items)
    record = runner.upload(next(chunks))  # the kill comes here: uploaded, no batch id yet
    chunks.close()
    made = None
    if created:  # ... or here: the provider made the batch, its reply never reached us
        client = openai.OpenAI(base_url=teacher.base_url, api_key="x", max_retries=0)
        made = client.batches.create(
            input_file_id=record.input_file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
        ).id
    (saved,) = _records(cfg.output)
    assert (saved["state"], saved["batch_id"]) == ("uploaded", None)

    summary = run(cfg)
    stats = teacher.stats()
    assert stats["batches_created"] == 1 and stats["files_uploaded"] == 1
    assert stats["by_problem"] == {i: 1 for i in IDS[:8]}
    (saved,) = _records(cfg.output)
    assert saved["state"] == "collected" and saved["input_file_id"] == record.input_file_id
    if made is not None:
        assert saved["batch_id"] == made
    assert (summary["rows"], summary["batches"]["resumed"], summary["batches"]["new"]) == (8, 1, 0)


def test_expired_batches_keep_their_answers_and_resubmit_the_rest_up_to_the_bound(
    teacher, tmp_path
) -> None:
    teacher.set_plan(FaultPlan(batch_faults=["expire"] * 3, expire_fraction=0.5))
    cfg = _cfg(tmp_path, teacher)
    summary = run(cfg)
    # Round 1 answers 4 of 8, round 2 2 of 4, round 3 1 of 2: one request is left.
    batches = summary["batches"]
    assert (batches["batches"], batches["expired"], batches["by_status"]) == (
        3,
        3,
        {"expired": 3},
    )
    assert (batches["resubmitted_requests"], batches["unanswered_requests"]) == (6, 1)
    assert (summary["rows"], summary["missing_rows"]) == (7, 1)
    assert [r["round"] for r in _records(cfg.output)] == [1, 2, 3]
    assert all(n == 1 for n in teacher.stats()["by_problem"].values())
    assert len(teacher.stats()["by_problem"]) == 7
    assert any("--batch-max-rounds" in w for w in summary["warnings"])

    teacher.set_plan(FaultPlan())
    teacher.reset_stats()
    again = run(cfg)
    assert (again["rows"], again["missing_rows"], teacher.stats()["requests"]) == (8, 0, 1)
    assert Counter(r["id"] for r in read_annotation_rows(cfg.output)) == {i: 1 for i in IDS[:8]}


def test_error_lines_are_rejected_rows_and_a_rerun_retries_the_transient_ones(
    teacher, tmp_path
) -> None:
    faults = {IDS[0]: ["500"], IDS[1]: ["400"], IDS[2]: ["429"], IDS[3]: ["close"]}
    teacher.set_plan(FaultPlan(per_problem=faults))
    cfg = _cfg(tmp_path, teacher)
    summary = run(cfg)
    rows = {r["id"]: r for r in read_annotation_rows(cfg.output)}
    assert len(rows) == 8
    for pid, kind in [(IDS[0], "500"), (IDS[1], "400"), (IDS[2], "429"), (IDS[3], "500")]:
        assert rows[pid]["status"] == "rejected" and rows[pid]["attempts"] == 1
        assert rows[pid]["reason"].startswith(f"api_error: {kind}: "), rows[pid]["reason"]
        assert "injected fault" in rows[pid]["reason"]  # the provider's message, as online
    assert summary["rejected_by_reason"] == {
        "api_error: 500": 2,
        "api_error: 400": 1,
        "api_error: 429": 1,
    }
    assert summary["batches"]["resubmitted_requests"] == 0  # an error line is an answer

    teacher.set_plan(FaultPlan())
    teacher.reset_stats()
    again = run(cfg)
    assert teacher.stats()["by_problem"] == {IDS[0]: 1, IDS[2]: 1, IDS[3]: 1}
    assert again["transient_rows_retried"] == 3
    assert again["rejected_by_reason"] == {"api_error: 400": 1}
    assert Counter(r["id"] for r in read_annotation_rows(cfg.output)) == {i: 1 for i in IDS[:8]}


@pytest.mark.parametrize("fault", ["lose_output", "fail"])
def test_a_lost_output_file_or_a_failed_batch_is_reported_and_resubmitted(
    teacher, tmp_path, fault
) -> None:
    teacher.set_plan(FaultPlan(batch_faults=[fault]))
    cfg = _cfg(tmp_path, teacher)
    summary = run(cfg)
    batches = summary["batches"]
    assert (summary["rows"], summary["missing_rows"]) == (8, 0)
    assert Counter(r["id"] for r in read_annotation_rows(cfg.output)) == {i: 1 for i in IDS[:8]}
    assert batches["resubmitted_requests"] == 8 and batches["batches"] == 2
    paid = teacher.stats()["by_problem"]
    if fault == "lose_output":
        assert (batches["lost_output_files"], batches["lost_output_requests"]) == (1, 8)
        assert paid == {i: 2 for i in IDS[:8]}  # answered, lost, answered again
        assert "LOST: 1 output file(s)" in format_summary(summary)
        assert any("paid for" in w for w in summary["warnings"])
    else:
        assert batches["failed"] == 1 and batches["lost_output_files"] == 0
        assert paid == {i: 1 for i in IDS[:8]}
    expected = {"completed": 2} if fault == "lose_output" else {"failed": 1, "completed": 1}
    assert batches["by_status"] == expected


def test_large_jobs_are_split_under_the_request_and_byte_limits(teacher, tmp_path) -> None:
    cfg = _cfg(tmp_path, teacher, batch_max_requests=3, batch_max_active=1)
    summary = run(cfg)
    assert [b["request_counts"]["total"] for b in teacher.batches()] == [3, 3, 2]
    assert summary["batches"]["batches"] == 3 and summary["rows"] == 8

    messages = next(iter_work_items(cfg, SAMPLE[:1]))[1]
    line = len(request_line("0" * 32, cfg.model, messages, cfg.sampling))
    limit = int(line * 2.5)
    by_bytes = _cfg(
        tmp_path, teacher, output=str(tmp_path / "bytes"), batch_max_bytes=limit,
        batch_keep_files=True,  # the uploads stay at the provider to be measured
    )  # fmt: skip
    before = set(teacher.files())
    summary = run(by_bytes)
    uploads = [f for k, f in teacher.files().items() if k not in before and f["purpose"] == "batch"]
    assert len(uploads) >= 4 and all(f["bytes"] <= limit for f in uploads)
    assert sum(b["request_counts"]["total"] for b in teacher.batches()[3:]) == 8
    assert summary["rows"] == 8

    with pytest.raises(ValueError, match="above --batch-max-bytes"):
        run(_cfg(tmp_path, teacher, output=str(tmp_path / "tiny"), batch_max_bytes=100))
    assert not list((tmp_path / "tiny" / "_batches").glob("*"))  # nothing left half-written

    # The spend cap stops new batches (the estimate check in `run` comes first, so drive the
    # runner itself): one batch of three fits under the cap, the second would not.
    priced = _cfg(tmp_path, teacher, output=str(tmp_path / "cap"), batch_max_requests=3)
    per_batch = 3 * 10 * 1000.0 / 1e6 / 2
    capped = replace(priced, price_out=1000.0, max_tokens=10, max_cost_usd=per_batch * 1.5)
    fs, root = output_fs(capped.output)
    items = iter_work_items(capped, load_problems(DatasetSpec.from_config(capped)))
    report = BatchRunner(capped, fs, root).run(items)
    assert report.new == 1 and report.requests == 3
    assert report.stopped and "--max-cost-usd" in report.stopped
    assert len(_records(capped.output)) == 1


def test_a_refused_key_stops_at_the_upload_and_creates_nothing(tmp_path) -> None:
    with TeacherServer(SAMPLE, api_key="right-key") as server:
        cfg = _cfg(tmp_path, server, api_key_env="WRONG_KEY_FOR_BATCH_TEST")
        with pytest.raises(FatalTeacherError, match=r"refused the request \(401\)"):
            run(cfg)
        stats = server.stats()
        assert (stats["files_uploaded"], stats["batches_created"], stats["requests"]) == (0, 0, 0)
        assert stats["by_status"] == {401: 1}  # one refused upload, no retry
    assert not list((Path(cfg.output) / "_batches").glob("*"))


def test_spend_refused_above_the_batch_estimate(teacher, tmp_path) -> None:
    est = run(_cfg(tmp_path, teacher, dry_run=True, price_in=1.0, price_out=2.0))["estimate"]
    with pytest.raises(SpendRefused):
        run(_cfg(tmp_path, teacher, price_in=1.0, price_out=2.0, max_cost_usd=est["cost_usd"] / 2))
    assert teacher.stats()["files_uploaded"] == 0
    with pytest.raises(ValueError, match="needs --mode teacher"):
        _cfg(tmp_path, teacher, mode="gold")


def test_kill_9_while_a_batch_runs_then_the_rerun_collects_it(teacher, tmp_path) -> None:
    """The CLI killed with SIGKILL mid-poll; the rerun polls the same batch, pays nothing again."""
    teacher.set_plan(FaultPlan(batch_polls=10**6))  # answers one line, then polls go on
    out = tmp_path / "out"
    args = [
        sys.executable, "pipelines/annotate.py", "--dataset", "sample", "--split", "all",
        "--limit", "8", "--output", str(out), "--base-url", teacher.base_url,
        "--model", "test-teacher", "--batch-api", "--batch-poll-s", "0.05",
    ]  # fmt: skip
    proc = subprocess.Popen(
        args,
        cwd=REPO,
        env=ENV,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and teacher.stats()["requests"] < 1:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert time.monotonic() < deadline, "the batch was never polled"
    (record,) = _records(str(out))
    assert record["state"] == "submitted" and record["batch_id"]
    assert teacher.stats()["requests"] == 1

    teacher.set_plan(FaultPlan(batch_polls=0))
    summary = run(_cfg(tmp_path, teacher))
    assert summary["batches"]["ids"] == [record["batch_id"]]
    stats = teacher.stats()
    assert (stats["batches_created"], stats["files_uploaded"]) == (1, 1)
    assert stats["by_problem"] == {i: 1 for i in IDS[:8]}
    assert Counter(r["id"] for r in read_annotation_rows(str(out))) == {i: 1 for i in IDS[:8]}


def test_the_teacher_servers_batch_endpoints(teacher) -> None:
    """What the pipeline relies on from the stand-in: pagination, cancel, delete, validation."""
    plan = FaultPlan(batch_polls=3, batch_faults=["ok", "expire"], expire_fraction=0.25)
    assert FaultPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    with pytest.raises(ValueError, match="unknown batch fault"):
        FaultPlan(batch_faults=["boom"])
    teacher.set_plan(plan)
    client = openai.OpenAI(base_url=teacher.base_url, api_key="x", max_retries=0)
    cfg = AnnotateConfig(dataset="sample", output="unused", model="m")
    lines = [
        request_line(f"k{i}", "m", messages, cfg.sampling)
        for i, (_, messages) in enumerate(iter_work_items(cfg, SAMPLE[:4]))
    ]
    upload = client.files.create(file=("in.jsonl", b"".join(lines)), purpose="batch")
    assert client.files.retrieve(upload.id).bytes == sum(map(len, lines))
    ids = [
        client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id
        for _ in range(3)
    ]
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
    assert [b.id for b in page.get_next_page().data] == ids[:1]
    assert [b.id for b in client.batches.list(limit=2)] == ids[::-1]  # auto-pagination

    first = client.batches.retrieve(ids[0])  # "ok": a share answered per poll
    assert (first.status, first.request_counts.completed) == ("in_progress", 1)
    assert client.batches.cancel(ids[0]).status == "cancelling"
    cancelled = client.batches.retrieve(ids[0])
    assert cancelled.status == "cancelled" and cancelled.error_file_id is None
    assert client.files.content(cancelled.output_file_id).text.count("\n") == 1
    for _ in range(4):
        expired = client.batches.retrieve(ids[1])  # "expire" at 1 of 4 answered
    assert (expired.status, expired.request_counts.completed) == ("expired", 1)
    errors = client.files.content(expired.error_file_id).text.splitlines()
    assert [json.loads(e)["error"]["code"] for e in errors] == ["batch_expired"] * 3
    assert client.files.delete(upload.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.content(upload.id)
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    bad = client.files.create(file=("bad.jsonl", lines[0] + lines[0]), purpose="batch")
    failed = client.batches.create(
        input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert failed.status == "failed" and "duplicate custom_id" in failed.errors.data[0].message
    assert teacher.stats()["batch_requests"] == 2
