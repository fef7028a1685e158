"""The run's money limits and stop signal, across actors, on real Ray, real HTTP, real Parquet.

A wrong key and the spend cap used to hold per actor: N actors made N x `--max-in-flight`
calls with a wrong key, and overshot the cap by the calls in flight in every actor. A run now
shares one ledger (`pipelines/run_ledger.py`). Also here: a fatal error reaches the driver as
its type, and a run closes its HTTP sessions (aiohttp, the default client) when its actors end.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pytest

from pipelines import annotate
from pipelines.annotate import run
from pipelines.annotator import TeacherAnnotator
from pipelines.chunks import fatal_cause
from pipelines.run_ledger import start_ledger
from pipelines.teacher_client import FatalTeacherError
from pipelines.work_items import iter_work_items
from serve.fake_teacher import TeacherServer, teacher_content
from socratic.adapters import DatasetSpec, load_problems
from tests.support.annotations import read_annotation_rows, sample_config

SAMPLE = list(load_problems(DatasetSpec("sample", split="all")))
BY_ID = {p.id: p for p in SAMPLE}


def _reply_tokens(p) -> int:
    """What the test teacher counts as the completion tokens of its answer to `p` (words)."""
    return len(teacher_content(p, socratic=True).split())


def test_a_fatal_error_in_a_ray_actor_reaches_the_driver_as_its_type(ray_cluster, tmp_path):
    import ray

    with TeacherServer(SAMPLE, api_key="right-key") as server:
        cfg = sample_config(tmp_path, server, limit=2)  # no key set: "EMPTY", refused
        items = [i for i, _ in iter_work_items(cfg, load_problems(DatasetSpec.from_config(cfg)))]
        actor = ray.remote(num_cpus=0)(TeacherAnnotator).remote(cfg)  # no ledger: it raises
        with pytest.raises(ray.exceptions.RayTaskError) as info:
            ray.get(actor.__call__.remote(pa.Table.from_pylist(items)))
        ray.kill(actor)
    fatal = fatal_cause(info.value)
    assert type(fatal) is FatalTeacherError and (fatal.kind, fatal.status) == ("401", 401)
    assert isinstance(info.value, FatalTeacherError)  # Ray's error is an instance of its cause
    # A cause Ray kept as text only is not dug out of the message any more.
    assert fatal_cause(RuntimeError("ray::MapWorker ... FatalTeacherError: refused")) is None

    # The run's ledger carries the first fatal error between processes with its fields.
    ledger = start_ledger(str(tmp_path / "out"), None, 4)
    try:
        ray.get(ledger.stop.remote(fatal))
        stop = ray.get(ledger.state.remote())["stop"]
    finally:
        ray.kill(ledger)
    assert type(stop) is FatalTeacherError and stop.__dict__ == fatal.__dict__


def test_two_actors_with_a_wrong_key_cost_at_most_max_in_flight_calls(ray_cluster, tmp_path):
    # Each reply (a 401) takes 3 s, so every actor has started its calls before any fails: a
    # per-actor bound lets each send --max-in-flight; the run's bound, all of them together.
    with TeacherServer(SAMPLE, api_key="right-key", latency_s=3.0) as server:
        cfg = sample_config(tmp_path, server, actors=2, max_in_flight=4)
        with pytest.raises(FatalTeacherError, match=r"refused the request \(401\)") as info:
            run(cfg)
        requests = server.stats()["requests"]
    assert 1 <= requests <= 4, requests
    assert info.value.status == 401


def test_the_spend_cap_holds_per_run_and_keeps_every_paid_answer(
    ray_cluster, tmp_path, monkeypatch
) -> None:
    longest = max(_reply_tokens(p) for p in SAMPLE)
    per_token = 1000.0 / 1e6
    # --max-tokens is the longest reply: the teacher keeps to it, as a real endpoint does.
    price = dict(price_in=0.0, price_out=1000.0, max_tokens=longest)
    cap = sum(_reply_tokens(p) for p in SAMPLE) * per_token / 2
    # The estimate (40 calls at --max-tokens) is above the cap, so the run would refuse to
    # start; an estimate the replies beat (a stale price table, say) lets it go, and the cap
    # has to hold during the run.
    estimate = annotate.estimate_spend
    monkeypatch.setattr(
        annotate, "estimate_spend", lambda cfg, done: {**estimate(cfg, done), "cost_usd": 0.0}
    )
    with TeacherServer(SAMPLE, latency_s=0.2) as server:
        cfg = sample_config(tmp_path, server, actors=2, max_in_flight=4, max_cost_usd=cap, **price)
        summary = run(cfg)
        stats = server.stats()
        rows = read_annotation_rows(cfg.output)
        served = sum(n * _reply_tokens(BY_ID[pid]) for pid, n in stats["by_problem"].items())
        assert served * per_token <= cap, (served * per_token, cap)  # what the teacher billed
        assert summary["cost_usd"] <= cap
        assert summary["stopped"] and "--max-cost-usd" in summary["stopped"]
        # Every answer paid for is a row in the output, and its usage is the teacher's.
        assert stats["requests"] == stats["by_status"][200] == len(rows) == summary["rows"]
        assert sum(r["completion_tokens"] for r in rows) == served
        assert 0 < summary["accepted"] == len(rows) < 40

        monkeypatch.undo()
        server.reset_stats()
        again = run(sample_config(tmp_path, server, actors=2, max_in_flight=4, **price))
        assert (again["rows"], again["missing_rows"], again["stopped"]) == (40, 0, None)
        assert server.stats()["requests"] == 40 - len(rows)  # none paid twice


def test_a_run_closes_its_http_sessions_when_its_actors_end(ray_cluster, tmp_path, capfd):
    """aiohttp reports an unclosed session and every pooled connection on stderr when its
    process ends (thousands of lines in the throughput benchmark); closed, it says nothing."""
    import ray._private.state as ray_state

    known = set(ray_state.actors())
    with TeacherServer(SAMPLE) as server:
        cfg = sample_config(tmp_path, server, limit=12, actors=2, max_in_flight=4)
        assert cfg.http_client == "aiohttp"  # the default
        assert run(cfg)["rows"] == 12
    deadline = time.monotonic() + 60
    while True:  # until this run's annotator actors have exited (and said all they would)
        mine = [
            a
            for k, a in ray_state.actors().items()
            if k not in known and "TeacherAnnotator" in a["ActorClassName"]
        ]
        if mine and all(a["State"] == "DEAD" for a in mine):
            break
        assert time.monotonic() < deadline, mine
        time.sleep(0.2)
    logs = Path(ray_cluster.address_info["session_dir"]) / "logs"
    files = [f for a in mine for f in logs.glob(f"worker-*-{a['Pid']}.err")]
    assert files, "no worker log found for the annotator actors"
    text = "".join(f.read_text(errors="replace") for f in files) + "".join(capfd.readouterr())
    assert "Unclosed" not in text, [line for line in text.splitlines() if "nclosed" in line][:4]
