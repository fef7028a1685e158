"""`ray job submit -- python pipelines/annotate.py ...` against a cluster from `ray start --head`.

This is how users run the stage, so it is tested the same way: the working dir is uploaded by
Ray, the entrypoint runs on the cluster, and the job reaches the teacher over HTTP.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serve.fake_teacher import TeacherServer
from socratic.adapters import DatasetSpec, load_problems
from socratic.ray_address import address_file, forget_cluster
from tests.support.paths import REPO

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def head_node(tmp_path: Path):
    """A one-node cluster on loopback, started like a user would, stopped by killing its group
    (`ray stop` would also stop the test session's own cluster). Then, as `ray stop` does, the
    address it left in `ray_current_cluster` is removed: a bare `ray.init()` afterwards would
    otherwise try to join a dead GCS for minutes."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
    gcs, dash = _free_port(), _free_port()
    # Every agent port is chosen fresh: the defaults (52365, ...) are taken by the test
    # session's own cluster, and a node whose agent cannot bind them never accepts a job.
    ports = []
    for flag in (
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
        "--ray-client-server-port",
    ):
        ports += [flag, str(_free_port())]
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
         "--num-cpus", "2", "--include-dashboard", "true", "--disable-usage-stats", *ports],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, "ray start exited"
            ok = (
                subprocess.run(
                    [str(BIN / "ray"), "job", "list", "--address", address],
                    env=env,
                    capture_output=True,
                ).returncode
                == 0
            )
            if ok:
                break
            assert time.monotonic() < deadline, "the head node's job server never came up"
            time.sleep(1)
        yield address, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)  # `ray start --block` can take 30 s to stop on SIGTERM
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        forget_cluster(f"127.0.0.1:{gcs}")
        left = address_file()
        assert not left.exists() or left.read_text().strip().rsplit(":", 1)[-1] != str(gcs), (
            f"{left} still names the stopped head"
        )


@pytest.mark.slow
def test_annotate_runs_as_a_ray_job(head_node, tmp_path: Path) -> None:
    address, env = head_node
    problems = list(load_problems(DatasetSpec("sample", split="all")))
    out = tmp_path / "job-out"
    with TeacherServer(problems) as server:
        runtime_env = {"excludes": [".venv", ".git", "*.parquet", ".pytest_cache", ".hypothesis"]}
        submit = [
            str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
            "--runtime-env-json", json.dumps(runtime_env), "--",
            sys.executable, "pipelines/annotate.py", "--dataset", "sample", "--split", "test",
            "--output", str(out), "--base-url", server.base_url, "--model", "test-teacher",
        ]  # fmt: skip
        deadline = time.monotonic() + 120
        while True:
            proc = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300)
            # The job server answers before the node's agent is up; then no job was started.
            if "No available agent" not in proc.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert server.stats()["requests"] == 8
    assert "rows 8/8" in proc.stdout and "accepted 8" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["rows"], summary["accepted"], summary["missing_rows"]) == (8, 8, 0)
