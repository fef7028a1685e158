"""A fake autoscaling Ray cluster on one machine: a head whose autoscaler adds worker "nodes"
(more raylets on this host) of the node types you give, as `ray up` would add cloud instances.

    python cluster/fake_autoscaling.py --head-cpus 2 \
        --node-type 'gpu_node={"CPU": 1, "fake_gpu": 1}:0:1'   # name=resources:min:max
    # prints the GCS address; Ctrl-C stops the head and every node its autoscaler added

For developing and testing what depends on autoscaling (serve/placement.py: an app whose
replicas fit only a node type that does not exist yet) without a cloud account. Worker nodes
cannot have real GPUs here; give them a custom resource (`fake_gpu`) and ask for that.

Why not `ray.cluster_utils.AutoscalingCluster`: in the Ray 2.60 wheel it cannot be built (its
template `fake_multi_node/example.yaml` is not shipped: FileNotFoundError), and its `start` and
`shutdown` run `ray stop --force`, which kills every Ray process of the user on the machine
(other test sessions included). Here the head runs `ray start --head --block` in a session of
its own, on free ports and its own temp dir, and the fake provider starts its worker nodes from
the head's autoscaler process, inside that session, so `stop` kills exactly that process group.
The provider is told the head's GCS address (it assumes port 6379 otherwise). Once the head is
up, its node types are published to the GCS (`cluster/node_types.py publish`), as
ray_cluster.yaml's head does, so a driver can read what the cluster can grow to.

Autoscaler v2 (what `ray up` runs by default since Ray 2.50) unless `autoscaler_v2=False`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# The fake provider's head id and type (ray.autoscaler._private.fake_multi_node.node_provider).
FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"
HEAD_TYPE = "ray.head.default"
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def cluster_config(
    head_resources: Mapping[str, float],
    worker_node_types: Mapping[str, Mapping[str, Any]],
    gcs_address: str,
    *,
    autoscaler_v2: bool = True,
    idle_timeout_minutes: float = 1.0,
) -> dict[str, Any]:
    """The autoscaling config `ray start --head --autoscaling-config` reads (the fake provider's
    example.yaml, which the wheel lacks, with these node types)."""
    types: dict[str, Any] = {}
    for name, spec in worker_node_types.items():
        types[name] = {
            "resources": dict(spec["resources"]),
            "node_config": dict(spec.get("node_config", {})),
            "min_workers": int(spec.get("min_workers", 0)),
            "max_workers": int(spec.get("max_workers", 1)),
        }
    types[HEAD_TYPE] = {"resources": dict(head_resources), "node_config": {}, "max_workers": 0}
    provider: dict[str, Any] = {
        # Type "fake_multinode" would make the autoscaler read its defaults from example.yaml,
        # which the wheel lacks; as an "external" provider it needs none.
        "type": "external",
        "module": FAKE_PROVIDER,
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
        "gcs_address": gcs_address,
    }
    if autoscaler_v2:
        provider.update(launch_multiple=True, head_node_id=FAKE_HEAD_NODE_ID)
    return {
        "cluster_name": "fake_multinode",
        "max_workers": sum(t["max_workers"] for t in types.values()),
        "provider": provider,
        "available_node_types": types,
        "head_node_type": HEAD_TYPE,
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


class FakeAutoscalingCluster:
    """`start()` -> GCS address ("127.0.0.1:PORT"); `stop()`; or use it as a context manager.

    head_resources: the head's resources ({"CPU": 2, ...}; "CPU" and "object_store_memory"
    become flags, the rest custom resources). worker_node_types: {name: {"resources": {...},
    "min_workers": 0, "max_workers": 1}}. env: extra environment for the head and every node
    (e.g. RAY_AUTH_MODE)."""

    def __init__(
        self,
        head_resources: Mapping[str, float],
        worker_node_types: Mapping[str, Mapping[str, Any]],
        *,
        autoscaler_v2: bool = True,
        env: Mapping[str, str] | None = None,
        object_store_mb: int = 256,
        idle_timeout_minutes: float = 1.0,
        publish_node_types: bool = True,
    ) -> None:
        self.head_resources = dict(head_resources)
        self.worker_node_types = {k: dict(v) for k, v in worker_node_types.items()}
        self.autoscaler_v2 = autoscaler_v2
        self.env = dict(env or {})
        self.object_store_mb = object_store_mb
        self.idle_timeout_minutes = idle_timeout_minutes
        self.publish_node_types = publish_node_types
        self.proc: subprocess.Popen | None = None
        self.temp_dir: Path | None = None
        self.address: str | None = None
        self.dashboard_address: str | None = None

    def start(self, timeout_s: float = 120.0) -> str:
        if self.proc is not None:
            raise RuntimeError("already started")
        gcs, dash, client, agent_grpc, agent_http, rt_env, metrics = _free_ports(7)
        self.address = f"127.0.0.1:{gcs}"
        self.dashboard_address = f"http://127.0.0.1:{dash}"
        # Short: Ray's socket paths under it must stay under 108 characters.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray-fake.", dir="/tmp"))
        config_path = self.temp_dir / "autoscaling.json"
        config_path.write_text(
            json.dumps(
                cluster_config(
                    self.head_resources,
                    self.worker_node_types,
                    self.address,
                    autoscaler_v2=self.autoscaler_v2,
                    idle_timeout_minutes=self.idle_timeout_minutes,
                )
            )
        )
        head = dict(self.head_resources)
        ray_bin = Path(sys.executable).parent / "ray"
        cmd = [
            str(ray_bin) if ray_bin.exists() else "ray", "start", "--head", "--block",
            f"--autoscaling-config={config_path}", "--temp-dir", str(self.temp_dir),
            "--node-ip-address", "127.0.0.1", "--port", str(gcs),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
            "--ray-client-server-port", str(client),
            "--dashboard-agent-grpc-port", str(agent_grpc),
            "--dashboard-agent-listen-port", str(agent_http),
            "--runtime-env-agent-port", str(rt_env), "--metrics-export-port", str(metrics),
            "--num-cpus", str(head.pop("CPU", 1)), "--num-gpus", str(head.pop("GPU", 0)),
            "--object-store-memory", str(self.object_store_mb * 1024 * 1024),
            "--disable-usage-stats",
        ]  # fmt: skip
        head.pop("object_store_memory", None)
        if head:
            cmd += ["--resources", json.dumps(head)]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.update(
            RAY_FAKE_CLUSTER="1",
            AUTOSCALER_UPDATE_INTERVAL_S="1",
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="3",
        )
        if self.autoscaler_v2:
            env.update(
                RAY_enable_autoscaler_v2="1",
                RAY_CLOUD_INSTANCE_ID=FAKE_HEAD_NODE_ID,
                RAY_OVERRIDE_NODE_ID_FOR_TESTING=FAKE_HEAD_NODE_ID,
                RAY_NODE_TYPE_NAME=HEAD_TYPE,
            )
        env.update(self.env)
        log = open(self.temp_dir / "head.log", "wb")  # noqa: SIM115 - the head outlives this call
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"the fake cluster's head exited during start:\n{tail}")
            if _port_open(gcs) and _port_open(dash):
                if self.publish_node_types:
                    self._publish(config_path, env)
                return self.address
            time.sleep(0.5)
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"the fake cluster did not come up within {timeout_s:.0f} s:\n{tail}")

    def _publish(self, config_path: Path, env: Mapping[str, str]) -> None:
        script = Path(__file__).with_name("node_types.py")
        cmd = [sys.executable, str(script), "publish", str(config_path), "--address", self.address]
        done = subprocess.run(cmd, env=dict(env), capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            self.stop()
            raise RuntimeError(f"publishing the node types failed:\n{done.stdout}{done.stderr}")

    def log_tail(self, lines: int = 30) -> str:
        if self.temp_dir is None:
            return ""
        out = []
        monitor = sorted(self.temp_dir.glob("session_latest/logs/monitor*"))
        for p in [self.temp_dir / "head.log", *monitor]:
            if p.is_file():
                text = p.read_text(errors="replace").splitlines()[-lines:]
                out.append("\n".join([f"--- {p.name}", *text]))
        return "\n".join(out)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the head's `ray start` (it stops its own processes in order), then
        SIGKILL to its process group (the head and every node its autoscaler started)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the leader's pid is the group id
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)

    def cleanup(self) -> None:
        """Stop, then remove the temp dir (logs included)."""
        self.stop()
        if self.temp_dir is not None and self.temp_dir.name.startswith("ray-fake."):
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> FakeAutoscalingCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def parse_node_type(text: str) -> tuple[str, dict[str, Any]]:
    """'name={"CPU": 1, "fake_gpu": 1}:MIN:MAX' -> (name, node type)."""
    name, _, rest = text.partition("=")
    resources, _, counts = rest.rpartition("}")
    lo, _, hi = counts.lstrip(":").partition(":")
    return name, {
        "resources": json.loads(resources + "}"),
        "min_workers": int(lo or 0),
        "max_workers": int(hi or 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="A fake autoscaling Ray cluster on this machine.")
    p.add_argument("--head-cpus", type=float, default=2)
    p.add_argument(
        "--node-type",
        action="append",
        default=[],
        help='NAME={"CPU": 1, "fake_gpu": 1}:MIN:MAX (repeatable)',
    )
    p.add_argument("--autoscaler-v1", action="store_true", help="the v1 autoscaler instead")
    a = p.parse_args(argv)
    types = dict(parse_node_type(t) for t in a.node_type)
    cluster = FakeAutoscalingCluster({"CPU": a.head_cpus}, types, autoscaler_v2=not a.autoscaler_v1)
    address = cluster.start()
    print(f"fake autoscaling cluster up: GCS {address}, dashboard {cluster.dashboard_address}")
    print(f"node types: {json.dumps(types)}; logs under {cluster.temp_dir}", flush=True)
    try:
        while cluster.proc is not None and cluster.proc.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
