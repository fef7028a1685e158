"""Which cluster a script joins: `--address` > RAY_ADDRESS > a fresh local cluster, never a
dead one named by a stale `ray_current_cluster` file; and whatever stops a cluster forgets it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from socratic.ray_address import (
    LOCAL,
    RayAddressError,
    address_file,
    forget_cluster,
    resolve_address,
)
from tests.support.paths import REPO

SCRIPT = REPO / "cluster" / "local_cluster.sh"


def _dead_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def listening():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield f"127.0.0.1:{s.getsockname()[1]}"


def test_no_flag_and_no_env_is_a_fresh_local_cluster_even_with_a_stale_address_file(
    tmp_path: Path,
) -> None:
    env = {"RAY_TMPDIR": str(tmp_path)}
    (tmp_path / "ray").mkdir()
    address_file(env).write_text(f"127.0.0.1:{_dead_port()}")  # a killed head left this
    assert resolve_address(None, env) == LOCAL


def test_flag_wins_over_env_and_a_live_address_is_returned(listening: str) -> None:
    env = {"RAY_ADDRESS": f"127.0.0.1:{_dead_port()}"}
    assert resolve_address(listening, env) == listening
    assert resolve_address(f"ray://{listening}", env) == f"ray://{listening}"
    assert resolve_address("local", env) == LOCAL


@pytest.mark.parametrize("where", ["--address", "RAY_ADDRESS"])
def test_a_dead_address_fails_at_once_naming_it_and_its_source(where: str) -> None:
    dead = f"127.0.0.1:{_dead_port()}"
    flag, env = (dead, {}) if where == "--address" else (None, {"RAY_ADDRESS": dead})
    with pytest.raises(RayAddressError) as e:
        resolve_address(flag, env, timeout_s=2)
    assert dead in str(e.value) and f"from {where}" in str(e.value)


def test_auto_reads_the_address_file_and_checks_it(tmp_path: Path) -> None:
    env = {"RAY_TMPDIR": str(tmp_path), "RAY_ADDRESS": "auto"}
    with pytest.raises(RayAddressError, match="names no running cluster"):
        resolve_address(None, env)
    (tmp_path / "ray").mkdir()
    dead = f"127.0.0.1:{_dead_port()}"
    address_file(env).write_text(dead)
    with pytest.raises(RayAddressError, match=dead):
        resolve_address(None, env, timeout_s=2)


def test_forget_removes_only_the_file_naming_that_cluster(tmp_path: Path) -> None:
    env = {"RAY_TMPDIR": str(tmp_path)}
    (tmp_path / "ray").mkdir()
    own = tmp_path / "own"
    own.mkdir()
    address_file(env).write_text("10.0.0.5:6390")  # Ray writes the node's IP, not 127.0.0.1
    (own / "ray_current_cluster").write_text("10.0.0.5:7777")  # another cluster's
    assert forget_cluster("127.0.0.1:6390", env, (None, own)) == [address_file(env)]
    assert not address_file(env).exists() and (own / "ray_current_cluster").exists()


def test_a_cli_given_a_dead_address_fails_in_seconds_with_a_message() -> None:
    """serve/app.py as a user runs it, RAY_ADDRESS pointing at a cluster that is gone."""
    dead = f"127.0.0.1:{_dead_port()}"
    env = {**os.environ, "RAY_ADDRESS": dead}
    out = subprocess.run(
        [sys.executable, "serve/app.py", "--decomposer", "d", "--solver", "s"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode != 0
    assert f"Ray address {dead} (from RAY_ADDRESS) does not answer" in out.stderr


def test_local_cluster_stop_forgets_the_address_it_left(tmp_path: Path) -> None:
    """`stop` on a cluster whose nodes are already gone (killed) still removes the address
    files naming its GCS, in its own temp dir and Ray's default one; another cluster's stays."""
    state_dir, temp, ray_tmp = tmp_path / "state", tmp_path / "ray-local.x", tmp_path / "tmp"
    for d in (state_dir, temp, ray_tmp / "ray"):
        d.mkdir(parents=True)
    gone = subprocess.Popen(["true"])
    gone.wait()
    (state_dir / "cluster.env").write_text(
        f"RAY_ADDRESS=http://127.0.0.1:1\nGCS_ADDRESS=127.0.0.1:6391\nHEAD_PID={gone.pid}\n"
        f"WORKER_PID={gone.pid}\nRAY_TEMP_DIR={temp}\nRAY_AUTH_MODE=disabled\n"
    )
    (temp / "ray_current_cluster").write_text("10.1.2.3:6391\n")
    (ray_tmp / "ray" / "ray_current_cluster").write_text("10.1.2.3:6391")
    env = {**os.environ, "LOCAL_CLUSTER_DIR": str(state_dir), "RAY_TMPDIR": str(ray_tmp)}
    out = subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert not (temp / "ray_current_cluster").exists()
    assert not (ray_tmp / "ray" / "ray_current_cluster").exists()

    (ray_tmp / "ray" / "ray_current_cluster").write_text("10.1.2.3:9999")
    (state_dir / "cluster.env").write_text(
        f"RAY_ADDRESS=x\nGCS_ADDRESS=127.0.0.1:6391\nHEAD_PID={gone.pid}\n"
        f"WORKER_PID={gone.pid}\nRAY_TEMP_DIR={temp}\nRAY_AUTH_MODE=disabled\n"
    )
    subprocess.run(["bash", str(SCRIPT), "stop"], env=env, check=True, capture_output=True)
    assert (ray_tmp / "ray" / "ray_current_cluster").read_text() == "10.1.2.3:9999"
