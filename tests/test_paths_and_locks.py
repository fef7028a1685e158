"""Paths resolved on the driver, and one run at a time per output folder (issue #22 item 4).

A relative `--output` (annotate) or model dir (evaluate) used to reach the Ray workers as it was
written, and a worker resolves it in its own working dir: under `ray job submit --working-dir`
that is the unpacked job package, so the journal landed there and the kill -9 resume found
nothing. The end-to-end test reproduces exactly that with `ray.init(runtime_env={"working_dir":
...})`. Two runs into one output used to both go ahead, the second one's resume step removing the
first one's in-progress files; now the second refuses, naming the first.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipelines import output_lock
from pipelines.annotate import AnnotateConfig
from pipelines.annotate import main as annotate_main
from pipelines.annotate import run as annotate_run
from pipelines.evaluate import EvaluateConfig
from pipelines.evaluate import main as evaluate_main
from pipelines.journal import JOURNAL_DIR, output_fs
from pipelines.output_lock import LOCK_NAME, OutputLock, OutputLocked, this_owner
from serve.fake_teacher import TeacherServer
from socratic.adapters import DatasetSpec, load_problems
from tests.support.annotations import read_annotation_rows
from tests.support.paths import REPO

SAMPLE = list(load_problems(DatasetSpec("sample", split="all")))
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
ROLES = ("decomposer", "solver", "unified", "cot", "answer")


def _lock(out: Path, **kw) -> OutputLock:
    return OutputLock(*output_fs(str(out)), "annotate", **kw)


def _write_lock(out: Path, **fields) -> dict:
    """A lock file as another run would have left it: ours, with `fields` changed."""
    owner = {**this_owner("annotate"), **fields}
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_NAME).write_text(json.dumps(owner))
    return owner


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid names no process now
    return proc.pid


# --- paths --------------------------------------------------------------------------------


def test_local_paths_become_absolute_on_the_driver_and_uris_stay(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = AnnotateConfig(
        dataset="sample", output="out", path="data/gsm8k_socratic.jsonl", prompt="p.yaml"
    ).with_absolute_paths()
    assert (cfg.output, cfg.path, cfg.prompt) == (
        str(tmp_path / "out"), str(tmp_path / "data/gsm8k_socratic.jsonl"), str(tmp_path / "p.yaml")
    )  # fmt: skip
    uri = AnnotateConfig(dataset="sample", output="s3://bucket/ann").with_absolute_paths()
    assert (uri.output, uri.path, uri.prompt) == ("s3://bucket/ann", None, None)
    home = AnnotateConfig(dataset="sample", output="~/ann").with_absolute_paths()
    assert home.output == str(Path.home() / "ann")

    ev = EvaluateConfig(
        dataset="sample", models="students", cot="other/cot", output="eval", path="t.jsonl"
    ).with_absolute_paths()
    assert (ev.output, ev.path) == (str(tmp_path / "eval"), str(tmp_path / "t.jsonl"))
    assert ev.model_dir("solver") == str(tmp_path / "students/solver")
    assert ev.model_dir("cot") == str(tmp_path / "other/cot")
    ev = EvaluateConfig(
        dataset="sample", models="s3://b/students", answer="s3://b/answer", output="gs://b/eval"
    ).with_absolute_paths()
    assert (ev.models, ev.answer, ev.output) == ("s3://b/students", "s3://b/answer", "gs://b/eval")


DRIVER = r"""
import json, os, sys, traceback
import ray

cwd, elsewhere, base_url = sys.argv[1:4]
os.chdir(cwd)
# What `ray job submit --working-dir` does: every worker of the job runs in the unpacked package.
ray.init(address="local", num_cpus=2, runtime_env={"working_dir": elsewhere},
         include_dashboard=False, configure_logging=False)
worker_cwd = ray.get(ray.remote(lambda: os.getcwd()).remote())
result = {"driver_cwd": os.getcwd(), "worker_cwd": worker_cwd}

from pipelines.annotate import AnnotateConfig, run as annotate
from pipelines.evaluate import EvaluateConfig, run as evaluate

try:
    s = annotate(AnnotateConfig(dataset="sample", split="test", output="out", base_url=base_url,
                                model="test-teacher", timeout=5.0, retry_base=0.01))
    result["annotate"] = {"rows": s["rows"], "output": s["output"]}
except Exception:
    result["annotate_error"] = traceback.format_exc()[-2000:]
result["stray_in_worker_cwd"] = sorted(
    os.path.relpath(os.path.join(d, f), worker_cwd)
    for d, _, files in os.walk(os.path.join(worker_cwd, "out")) for f in files
)
try:
    s = evaluate(EvaluateConfig(dataset="sample", split="test", models="students",
                                methods="answer", output="eval", max_new_tokens=8, batch_size=8))
    result["evaluate"] = {"problems": s["results"][0]["problems"], "output": s["output"]}
except Exception:
    result["evaluate_error"] = traceback.format_exc()[-2000:]
print("RESULT " + json.dumps(result))
"""


@pytest.mark.slow
def test_relative_paths_reach_workers_that_run_in_another_directory(
    tmp_path, tiny_model_dir
) -> None:
    """A driver in one dir, its workers in another (as under `ray job submit --working-dir`):
    annotate's journal lands in the output the driver names, and evaluate's actors load the
    model dirs the driver checked. Before the fix the journal was written under the worker's dir
    (and never cleared) and evaluate's actors failed to find `students/answer`."""
    cwd, elsewhere = tmp_path / "cwd", tmp_path / "job-package"
    elsewhere.mkdir()
    (elsewhere / "README").write_text("the job's working dir\n")
    shutil.copytree(tiny_model_dir, cwd / "students" / "answer")
    problems = [p for p in SAMPLE if p.split == "test"]
    with TeacherServer(SAMPLE) as server:
        proc = subprocess.run(
            [sys.executable, "-c", DRIVER, str(cwd), str(elsewhere), server.base_url],
            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=420,
        )  # fmt: skip
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    # The set-up reproduces the bug's condition: the workers do not share the driver's dir.
    assert Path(result["worker_cwd"]).resolve() != cwd.resolve()
    assert "annotate_error" not in result, result["annotate_error"]
    assert result["annotate"] == {"rows": len(problems), "output": str(cwd / "out")}
    assert result["stray_in_worker_cwd"] == [], "the journal landed in the worker's own dir"
    assert len(read_annotation_rows(str(cwd / "out"))) == len(problems)
    assert not list((cwd / "out" / JOURNAL_DIR).glob("*.jsonl"))  # compacted, then cleared
    assert "evaluate_error" not in result, result["evaluate_error"]
    assert result["evaluate"] == {"problems": len(problems), "output": str(cwd / "eval")}
    assert list((cwd / "eval" / "predictions" / "answer").glob("*.parquet"))
    assert not (cwd / "out" / LOCK_NAME).exists() and not (cwd / "eval" / LOCK_NAME).exists()


# --- the output lock ----------------------------------------------------------------------


def _in_progress(out: Path) -> dict[Path, bytes]:
    """What a live annotate run has in its output: a Parquet file being written (unreadable as
    yet) and its journal. A second run's resume step would remove the first and compact the
    second."""
    (out / JOURNAL_DIR).mkdir(parents=True)
    files = {
        out / "part-000001.parquet": b"PAR1 half-written",
        out / JOURNAL_DIR / "a1b2c3.jsonl": b'{"cache_key": "k0", "status": "accepted"}\n',
    }
    for path, data in files.items():
        path.write_bytes(data)
    return files


def test_a_second_annotate_run_refuses_naming_the_first_and_touches_nothing(
    tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    files = _in_progress(out)
    with _lock(out) as first:  # a live run: this test process
        rc = annotate_main(["--dataset", "sample", "--mode", "gold", "--output", "out"])
        err = capsys.readouterr().err
        assert rc == 4, err
        owner = first.owner
        assert f"pid {owner['pid']} on {owner['host']}" in err
        assert f"started {owner['started_at']}" in err and str(out) in err
        assert "Wait for it to finish" in err and "--force-unlock" not in err
        assert {p: p.read_bytes() for p in files} == files  # untouched
        assert json.loads((out / LOCK_NAME).read_text())["token"] == owner["token"]
    assert not (out / LOCK_NAME).exists()  # released on leaving


def test_a_second_evaluate_run_refuses_before_replacing_predictions(tmp_path, capsys) -> None:
    models, out = tmp_path / "students", tmp_path / "eval"
    (models / "answer").mkdir(parents=True)
    (models / "answer" / "config.json").write_text("{}")
    first = out / "predictions" / "answer" / "part-0.parquet"
    first.parent.mkdir(parents=True)
    first.write_bytes(b"PAR1 being written")
    with OutputLock(*output_fs(str(out)), "evaluate") as held:
        rc = evaluate_main(["--dataset", "sample", "--methods", "answer",
                            "--models", str(models), "--output", str(out)])  # fmt: skip
        err, pid = capsys.readouterr().err, held.owner["pid"]
    assert rc == 4 and f"evaluate run, pid {pid} on {socket.gethostname()}" in err, err
    assert first.read_bytes() == b"PAR1 being written"


def test_a_run_started_in_another_process_is_named_then_taken_over_after_kill_9(
    tmp_path, caplog
) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pipelines.journal import output_fs; "
         "from pipelines.output_lock import OutputLock; "
         "OutputLock(*output_fs(sys.argv[1]), 'annotate').acquire(); print('held', flush=True); "
         "time.sleep(120)", str(out)],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLocked, match=rf"pid {holder.pid} on {socket.gethostname()}"):
            _lock(out).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid  # left behind
    caplog.set_level(logging.WARNING, logger="output_lock")
    with _lock(out) as lock:
        assert json.loads((out / LOCK_NAME).read_text())["token"] == lock.owner["token"]
    assert f"stale lock of annotate run, pid {holder.pid}" in caplog.text
    assert not (out / LOCK_NAME).exists()


def test_annotate_takes_over_a_dead_runs_lock_and_resumes(ray_cluster, tmp_path, caplog) -> None:
    out = tmp_path / "out"
    dead = _write_lock(out, pid=_dead_pid(), started_at="2026-01-01T00:00:00+00:00")
    caplog.set_level(logging.WARNING, logger="output_lock")
    summary = annotate_run(AnnotateConfig(dataset="sample", split="test", mode="gold",
                                          output=str(out)))  # fmt: skip
    assert summary["rows"] == summary["accepted"] == 8
    assert f"pid {dead['pid']}" in caplog.text and "taking over the stale lock" in caplog.text
    assert not (out / LOCK_NAME).exists()


def test_a_lock_from_another_host_needs_force_unlock(tmp_path, caplog) -> None:
    out = tmp_path / "out"
    _write_lock(out, host="gpu-node-7", pid=4242)
    with pytest.raises(OutputLocked) as e:
        _lock(out).acquire()
    assert "pid 4242 on gpu-node-7" in str(e.value) and "--force-unlock" in str(e.value)
    assert e.value.owner["host"] == "gpu-node-7"
    # Another pid namespace on this host (a container) cannot be checked either.
    _write_lock(out, pid=4242, pid_ns="pid:[1]")
    with pytest.raises(OutputLocked, match="another pid namespace"):
        _lock(out).acquire()
    caplog.set_level(logging.WARNING, logger="output_lock")
    with _lock(out, force=True) as lock:
        assert json.loads((out / LOCK_NAME).read_text())["token"] == lock.owner["token"]
    assert "--force-unlock: taking over" in caplog.text


def test_force_unlock_never_takes_a_live_run_on_this_host(tmp_path) -> None:
    out = tmp_path / "out"
    with _lock(out), pytest.raises(OutputLocked, match="in use by another run"):
        _lock(out, force=True).acquire()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_a_recycled_pid_or_a_reboot_is_not_mistaken_for_the_owner(tmp_path) -> None:
    out = tmp_path / "out"
    me = this_owner("annotate")
    _write_lock(out, pid_start=me["pid_start"] - 1)  # our pid, an earlier process
    with _lock(out):
        pass
    _write_lock(out, boot_id="0000-before-the-reboot")  # our pid, before a restart
    with _lock(out):
        pass
    assert not (out / LOCK_NAME).exists()


def test_an_unreadable_lock_is_taken_over_after_a_grace(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(output_lock, "UNREADABLE_GRACE_S", 0.2)
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_bytes(b"")  # a kill between creating the lock and writing it
    with _lock(out) as lock:
        assert json.loads((out / LOCK_NAME).read_text())["token"] == lock.owner["token"]


def test_of_runs_starting_at_once_exactly_one_gets_the_lock(tmp_path) -> None:
    out, n = tmp_path / "out", 8
    barrier, won, refused = threading.Barrier(n), [], []

    def start() -> None:
        lock = _lock(out)
        barrier.wait()
        try:
            lock.acquire()
            won.append(lock)
        except OutputLocked:
            refused.append(lock)

    threads = [threading.Thread(target=start) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(won), len(refused)) == (1, n - 1)
    won[0].release()
    assert not (out / LOCK_NAME).exists()


def test_the_lock_is_released_when_the_run_fails(tmp_path) -> None:
    from pipelines.annotate import SpendRefused

    out = tmp_path / "out"
    cfg = AnnotateConfig(dataset="sample", output=str(out), base_url="http://127.0.0.1:9/v1",
                         price_in=1000.0, max_cost_usd=0.000001)  # fmt: skip
    with pytest.raises(SpendRefused):
        annotate_run(cfg)  # refused after the lock was taken and the output prepared
    assert out.is_dir() and not (out / LOCK_NAME).exists()


def test_a_lock_taken_over_mid_run_is_left_to_its_new_owner(tmp_path, caplog) -> None:
    out = tmp_path / "out"
    lock = _lock(out)
    lock.acquire()
    theirs = _write_lock(out, host="elsewhere")  # taken with --force-unlock from another host
    caplog.set_level(logging.WARNING, logger="output_lock")
    lock.release()
    assert json.loads((out / LOCK_NAME).read_text())["token"] == theirs["token"]
    assert "taken over during this run" in caplog.text


def test_remote_filesystems_write_then_read_back(tmp_path, monkeypatch) -> None:
    """pyarrow's remote filesystems have no create-if-absent: the lock is written, read back
    after a settle and checked (a SubTreeFileSystem over a local dir takes that path)."""
    monkeypatch.setattr(output_lock, "REMOTE_SETTLE_S", 0.0)
    (tmp_path / "bucket").mkdir()
    fs = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    first = OutputLock(fs, "ann", "annotate")
    assert not first.local
    with first:
        with pytest.raises(OutputLocked, match="in use by another run"):
            OutputLock(fs, "ann", "annotate").acquire()
        assert (tmp_path / "bucket" / "ann" / LOCK_NAME).exists()
    assert not (tmp_path / "bucket" / "ann" / LOCK_NAME).exists()
    _write_lock(tmp_path / "bucket" / "ann", pid=_dead_pid())
    with OutputLock(fs, "ann", "annotate"):
        pass
