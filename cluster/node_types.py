"""Publish the node types an autoscaling cluster can add, where every driver can read them.

    python cluster/node_types.py publish ~/ray_bootstrap_config.yaml --address 127.0.0.1:6379
    python cluster/node_types.py show --address 127.0.0.1:6379

Why: an app builder (serve/app.py `build_app`) checks that each replica fits somewhere before it
deploys, and on an autoscaling cluster "somewhere" includes the nodes the autoscaler can still
add. Ray keeps those node types in the GCS as a `ClusterConfig` (internal KV, namespace
`GCS_AUTOSCALER_STATE_NAMESPACE`, key `GCS_AUTOSCALER_CLUSTER_CONFIG_KEY`), read with
`ray._private.state.state.get_cluster_config()` (Ray Data's autoscaler reads it there too). Newer
Ray autoscalers (v2) report it themselves; the Ray 2.60 autoscaler does not (measured: the key is
empty on a `ray up`-style v2 cluster), so ray_cluster.yaml's head runs `publish` after `ray
start`, with the same mapping: every node type but the head's, its `resources`, `min_workers`,
`max_workers`. The autoscaling config is the file the head's autoscaler reads
(`~/ray_bootstrap_config.yaml` under `ray up`).

Standalone (Ray and PyYAML only): it runs on the head from the synced checkout.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml


def to_cluster_config(autoscaling: Mapping[str, Any]):
    """The `ClusterConfig` protobuf for an autoscaling config (head type left out: it never
    scales). Resources are integers in the protobuf, as in the config schema."""
    from ray.core.generated.autoscaler_pb2 import ClusterConfig, NodeGroupConfig

    out = ClusterConfig()
    head = autoscaling.get("head_node_type")
    for name, spec in (autoscaling.get("available_node_types") or {}).items():
        if name == head:
            continue
        group = NodeGroupConfig(name=name)
        for key, value in (spec.get("resources") or {}).items():
            group.resources[key] = int(value)
        group.min_count = int(spec.get("min_workers", 0))
        group.max_count = int(spec.get("max_workers", autoscaling.get("max_workers", 0)))
        out.node_group_configs.append(group)
    return out


def publish(autoscaling: Mapping[str, Any], gcs_address: str) -> int:
    """Write the node types to the cluster's GCS; returns how many."""
    from ray._raylet import GcsClient

    config = to_cluster_config(autoscaling)
    GcsClient(address=gcs_address).report_cluster_config(config.SerializeToString())
    return len(config.node_group_configs)


def read(gcs_address: str) -> list[dict[str, Any]] | None:
    """The published node types ({name, resources, min_count, max_count}), or None."""
    from ray._raylet import GcsClient
    from ray.core.generated.autoscaler_pb2 import ClusterConfig

    raw = GcsClient(address=gcs_address).internal_kv_get(_key(), namespace=_namespace(), timeout=10)
    if not raw:
        return None
    return [
        {
            "name": g.name,
            "resources": dict(g.resources),
            "min_count": g.min_count,
            "max_count": g.max_count,
        }
        for g in ClusterConfig.FromString(raw).node_group_configs
    ]


def _key() -> bytes:
    import ray._raylet

    return ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode()


def _namespace() -> bytes:
    import ray._raylet

    return ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Publish / show the node types a cluster can add.")
    sub = p.add_subparsers(dest="cmd", required=True)
    pub = sub.add_parser("publish", help="write an autoscaling config's node types to the GCS")
    pub.add_argument("config", type=Path, help="the autoscaling config (YAML or JSON)")
    pub.add_argument("--address", default="127.0.0.1:6379", help="GCS address (host:port)")
    show = sub.add_parser("show", help="print the node types the GCS holds")
    show.add_argument("--address", default="127.0.0.1:6379", help="GCS address (host:port)")
    a = p.parse_args(argv)
    if a.cmd == "publish":
        config = yaml.safe_load(a.config.expanduser().read_text())
        n = publish(config, a.address)
        print(f"published {n} node type(s) from {a.config} to {a.address}")
    else:
        print(json.dumps(read(a.address), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
