"""Which Ray cluster a script joins: `--address` flag > `RAY_ADDRESS` > a fresh local cluster.

Why not `ray.init(address=None)`: with no `RAY_ADDRESS` Ray joins the cluster named in its
`ray_current_cluster` file, which `ray start --head` writes and only `ray stop` removes. A head
stopped any other way (killed, its machine rebooted) leaves the file naming a dead GCS, and the
next script then retries it for minutes ("Failed to connect to GCS at address ..."). Every
script's `--address` help says "RAY_ADDRESS or a local cluster", and `resolve_address` makes that
true. A given address is probed with a TCP connect first, so a dead one fails in seconds with a
message naming it and where it came from, instead of Ray's own retries.

Ray-free (stdlib only): `socratic/` must import without Ray.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

LOCAL = "local"
PROBE_TIMEOUT_S = 3.0
ADDRESS_FILE = "ray_current_cluster"
# Ray's own default ports, for addresses written without one.
_DEFAULT_PORTS = {"ray": 10001, "http": 8265, "https": 443, "": 6379}


class RayAddressError(RuntimeError):
    """The Ray address a script was told to use does not answer."""


def resolve_address(
    flag: str | None,
    env: Mapping[str, str] | None = None,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> str:
    """The `address` to pass to `ray.init`: the flag, else `RAY_ADDRESS`, else `"local"` (a
    fresh cluster on this machine, never the one a stale `ray_current_cluster` names).

    `"local"` is returned as is; `"auto"` is the cluster named in `ray_current_cluster`, checked
    like any other address. Raises `RayAddressError` when the address does not accept a TCP
    connection within `timeout_s`."""
    env = os.environ if env is None else env
    if flag:
        address, source = flag, "--address"
    elif env.get("RAY_ADDRESS"):
        address, source = env["RAY_ADDRESS"], "RAY_ADDRESS"
    else:
        return LOCAL
    if address == LOCAL:
        return LOCAL
    if address == "auto":
        path = address_file(env)
        current = path.read_text().strip() if path.is_file() else ""
        if not current:
            raise RayAddressError(
                f"Ray address 'auto' (from {source}) names no running cluster: {path} is absent"
            )
        source = f"{source}=auto, read from {path}"
        address = current
    host, port = host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        raise RayAddressError(
            f"Ray address {address} (from {source}) does not answer within {timeout_s:g} s "
            f"({e.strerror or e}). Start that cluster, or unset {source.split('=')[0]} / pass "
            f"--address local for a fresh local cluster."
        ) from None
    return address


def host_port(address: str) -> tuple[str, int]:
    """(host, port) of a Ray address: `host:port`, `ray://host:port` or `http://host:port`."""
    parts = urlsplit(address if "://" in address else f"//{address}")
    if not parts.hostname:
        raise RayAddressError(f"cannot read a host from Ray address {address!r}")
    try:
        port = parts.port
    except ValueError:
        raise RayAddressError(f"cannot read a port from Ray address {address!r}") from None
    return parts.hostname, port or _DEFAULT_PORTS.get(parts.scheme, 6379)


def address_file(env: Mapping[str, str] | None = None, temp_dir: str | Path | None = None) -> Path:
    """Where Ray keeps the address of the last cluster `ray start --head` began (as Ray finds
    its default temp dir: RAY_TMPDIR, TMPDIR on Linux, else /tmp)."""
    env = os.environ if env is None else env
    if temp_dir is None:
        base = env.get("RAY_TMPDIR") or env.get("TMPDIR") or "/tmp"
        temp_dir = Path(base) / "ray"
    return Path(temp_dir) / ADDRESS_FILE


def forget_cluster(
    gcs_address: str,
    env: Mapping[str, str] | None = None,
    temp_dirs: tuple[str | Path | None, ...] = (None,),
) -> list[Path]:
    """Remove every `ray_current_cluster` file that names the cluster at `gcs_address`, as
    `ray stop` does; for code that stops a head without `ray stop` (which would stop every Ray
    on the machine). Matched on the GCS port: Ray writes the node's resolved IP, not the
    `127.0.0.1` it was given. A file naming another cluster is left alone. Returns the files
    removed."""
    port = host_port(gcs_address)[1]
    removed = []
    for temp_dir in temp_dirs:
        path = address_file(env, temp_dir)
        try:
            if host_port(path.read_text().strip())[1] == port:
                path.unlink()
                removed.append(path)
        except (OSError, RayAddressError):
            continue
    return removed
