"""Size the app's replicas to the cluster it joins, and refuse an app that cannot be placed.

Why: Serve places a replica only where its `ray_actor_options` fit, and one that fits nowhere
waits for ever ("total resources available: {}" every 30 s; measured on Ray 2.60 with two 1-CPU
model replicas and a 0.1-CPU ingress on 2 CPUs). So a deployment that states no CPUs gets a
share of the cluster's CPUs (`size_to_cluster`): a little for the ingress, the rest split
between every model replica the autoscalers may start. A deployment that states its resources is
checked (`check_fits`): if its minimum replicas cannot all be placed, the app fails at once with
a `PlacementError` naming what it asked for and what the cluster has.

On an autoscaling cluster "what the cluster has" includes the nodes its autoscaler can still add
(`growable_node_types`: the node types the GCS holds, see cluster/node_types.py; or the app's
`node_types` argument). A replica that fits only a node type that does not exist yet is fine:
Serve waits while the autoscaler adds one (logged). The app fails fast only when neither a node
present nor any node type could ever hold a replica. GPUs and custom resources are checked
alike: a replica asking for `num_gpus: 0.5` needs a node (type) with `GPU`, one asking for
`resources: {fake_gpu: 0.5}` a node (type) with `fake_gpu`. A node type that states no `memory`
is taken to have enough (the autoscaler fills memory in from the instance).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

MODELS = ("Decomposer", "Solver")
INGRESS = "Ingress"
INGRESS_CPUS = 0.1  # the ingress holds no model: a little CPU for HTTP and the loop
MAX_MODEL_CPUS = 1.0  # more logical CPUs per replica than torch's threads would use is waste


# Resources a node type may leave unstated (the autoscaler fills them in from the instance).
UNSTATED_OK = ("memory", "object_store_memory")
EPS = 1e-9


class PlacementError(RuntimeError):
    """The app asks for more than the cluster has, or could ever have."""


@dataclass(frozen=True)
class NodeType:
    """A node the autoscaler can add: its resources and how many at most (None: no limit)."""

    resources: dict[str, float]
    max_count: int | None = None
    name: str = ""

    def label(self) -> str:
        return self.name or json.dumps(self.resources, sort_keys=True)


def parse_node_types(spec: Sequence[Mapping[str, Any]]) -> list[NodeType]:
    """The app's `node_types` argument: a list of either resource dicts (`{"CPU": 48, "GPU": 4}`,
    any number of such nodes) or `{"name": ..., "resources": {...}, "max_workers": N}`."""
    out = []
    for i, entry in enumerate(spec):
        if not isinstance(entry, Mapping):
            raise ValueError(f"node_types[{i}] is not a mapping: {entry!r}")
        if "resources" in entry:
            res, hi = entry["resources"], entry.get("max_workers")
            name = str(entry.get("name", ""))
        else:
            res, hi, name = entry, None, ""
        out.append(
            NodeType(
                {str(k): float(v) for k, v in res.items()},
                None if hi is None or int(hi) < 0 else int(hi),
                name,
            )
        )
    return [t for t in out if t.max_count != 0]


def growable_node_types() -> list[NodeType] | None:
    """The node types this cluster's autoscaler can add (those with `max_count` > 0 or no
    limit), or None where the cluster publishes none (a fixed cluster, or an autoscaler that
    does not say). Needs a connected Ray (`ray.init`).

    Read from the GCS's `ClusterConfig` (`ray._private.state.state.get_cluster_config()`, the
    source Ray Data's autoscaler reads too): newer Ray autoscalers (v2) report it, and on Ray
    2.60, whose autoscaler does not, ray_cluster.yaml's head publishes it
    (`cluster/node_types.py publish`). `ray status` and `ray.autoscaler.v2.sdk.get_cluster_status`
    show node type *names* of nodes that exist or are pending, never what a type holds."""
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception as e:  # an older GCS, no connection: as if none were published
        log.debug("no cluster config from the GCS: %s", e)
        return None
    if config is None or not config.node_group_configs:
        return None
    return [
        NodeType(
            {k: float(v) for k, v in g.resources.items()},
            None if g.max_count < 0 else int(g.max_count),
            g.name,
        )
        for g in config.node_group_configs
        if g.max_count != 0 and g.resources
    ]


def autoscaler_running() -> bool:
    """Whether an autoscaler that may add nodes watches this cluster (needs `ray.init`).

    Every Ray head runs an autoscaler process; one started without an autoscaling config (a
    plain `ray.init()`, `ray start --head`) is read-only and names each node's type after the
    node (`node_<id>`, `ray.autoscaler._private.util.format_readonly_node_type`). Node type
    names from a config (ray_cluster.yaml's `gpu_a10g_x4`, a KubeRay worker group) mean nodes
    can be added. Read from the v2 autoscaler's status, else from the v1 status in the KV."""
    try:
        import ray
        from ray.autoscaler._private.util import format_readonly_node_type
        from ray.autoscaler.v2.utils import is_autoscaler_v2
        from ray.experimental.internal_kv import _internal_kv_get

        if is_autoscaler_v2(fetch_from_server=True):
            from ray.autoscaler.v2.sdk import get_cluster_status

            gcs = ray.get_runtime_context().gcs_address
            status = get_cluster_status(gcs)
            nodes = [*status.active_nodes, *status.idle_nodes]
            types = {n.node_id: n.ray_node_type_name for n in nodes}
        else:
            raw = _internal_kv_get("__autoscaling_status")  # ray_constants.DEBUG_AUTOSCALING_STATUS
            report = (json.loads(raw) if raw else {}).get("autoscaler_report") or {}
            types = report.get("node_type_mapping") or {}
        return any(t and t != format_readonly_node_type(k) for k, t in types.items())
    except Exception as e:
        log.debug("could not tell whether an autoscaler runs: %s", e)
        return False


def replica_range(options: Mapping[str, Any]) -> tuple[int, int]:
    """(min, max) replicas of a deployment from its options (autoscaling or num_replicas)."""
    auto = options.get("autoscaling_config")
    if auto:
        lo = int(auto.get("min_replicas", 1))
        return lo, max(lo, int(auto.get("max_replicas", lo)))
    n = options.get("num_replicas", 1)
    n = n if isinstance(n, int) else 1
    return n, n


def _floor(x: float, step: float = 0.01) -> float:
    return math.floor(x / step + 1e-9) * step


def _holds(node: Mapping[str, float], need: Mapping[str, float], *, node_type: bool) -> bool:
    """One node (or a node of a type) has room for `need` (an empty node; a node type may
    leave memory unstated)."""
    return all(
        node.get(k, math.inf if node_type and k in UNSTATED_OK else 0.0) + EPS >= v
        for k, v in need.items()
    )


def _new_node_type(
    need: Mapping[str, float],
    nodes: Sequence[Mapping[str, float]] | None,
    node_types: Sequence[NodeType] | None,
) -> NodeType | None:
    """The node type a replica must wait for: None if a present node could hold it (or the
    present nodes are unknown), or if no node type can. Of the types that can, the one holding
    most replicas of it (then the most CPUs)."""
    if not node_types or nodes is None or any(_holds(n, need, node_type=False) for n in nodes):
        return None
    fits = [t for t in node_types if _holds(t.resources, need, node_type=True)]
    if not fits:
        return None
    return max(fits, key=lambda t: (_per_node(t, need), t.resources.get("CPU", 0.0)))


def _per_node(t: NodeType, need: Mapping[str, float]) -> int:
    """How many replicas asking for `need` one node of type `t` holds (by its non-CPU needs)."""
    counts = [
        math.floor(t.resources[k] / v + EPS)
        for k, v in need.items()
        if k != "CPU" and v > 0 and k in t.resources
    ]
    return max(1, min(counts)) if counts else 1


def size_to_cluster(
    options: Mapping[str, Mapping[str, Any]],
    cluster: Mapping[str, float],
    node_types: Sequence[NodeType] | None = None,
    nodes: Sequence[Mapping[str, float]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Options per deployment (`Decomposer`, `Solver`, `Ingress`) with `num_cpus` filled in
    where the caller gave none, so that every replica at its maximum count fits in `cluster`
    (`ray.cluster_resources()`). Stated values are kept as given.

    With `node_types` (what the autoscaler can add) and `nodes` (each present node's
    resources): a model replica whose other needs (GPU, custom resources) no present node has
    is sized against the node type it waits for instead, a share of that type's CPUs per
    replica it holds (two replicas at `fake_gpu: 0.5` on a `{CPU: 1, fake_gpu: 1}` node get 0.5
    CPU each); and where the present nodes have no CPU left for the rest (a 0-CPU head), they
    share the largest node type's CPUs."""
    out = {name: copy.deepcopy(dict(options.get(name, {}))) for name in (*MODELS, INGRESS)}
    actor = {name: out[name].setdefault("ray_actor_options", {}) for name in out}
    cpus = float(cluster.get("CPU", 0.0))
    ingress_max = replica_range(out[INGRESS])[1]
    if "num_cpus" not in actor[INGRESS]:
        actor[INGRESS]["num_cpus"] = max(0.01, _floor(min(INGRESS_CPUS, 0.05 * cpus / ingress_max)))
    fixed = replica_range(out[INGRESS])[1] * actor[INGRESS]["num_cpus"]
    free: list[str] = []
    for name in MODELS:
        n = replica_range(out[name])[1]
        other = {k: v for k, v in _needs(out[name]).items() if k != "CPU"}
        waits_for = _new_node_type(other, nodes, node_types)
        if waits_for is not None:
            if "num_cpus" not in actor[name]:
                per_node = _per_node(waits_for, other)
                share = waits_for.resources.get("CPU", 0.0) / per_node
                actor[name]["num_cpus"] = max(_floor(min(MAX_MODEL_CPUS, share)), 0.01)
        elif "num_cpus" in actor[name]:
            fixed += n * actor[name]["num_cpus"]
        else:
            free.append(name)
    if free:
        slots = sum(replica_range(out[name])[1] for name in free)
        room = max(cpus - fixed, 0.0)
        biggest = max((t.resources.get("CPU", 0.0) for t in node_types or ()), default=0.0)
        if room / slots < 0.01 and biggest > 0:  # nothing here yet: they go to new nodes
            room = biggest
        share = _floor(min(MAX_MODEL_CPUS, room / slots))
        for name in free:
            actor[name]["num_cpus"] = max(share, 0.01)
    return out


def _needs(options: Mapping[str, Any]) -> dict[str, float]:
    actor = options.get("ray_actor_options", {})
    need = {
        "CPU": float(actor.get("num_cpus", 1.0)),
        "GPU": float(actor.get("num_gpus", 0.0)),
        "memory": float(actor.get("memory", 0.0) or 0.0),
    }
    for k, v in (actor.get("resources") or {}).items():
        need[k] = need.get(k, 0.0) + float(v)
    return {k: v for k, v in need.items() if v > 0}


def _fmt(resources: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items())) or "nothing"


def _fmt_types(node_types: Sequence[NodeType], keys: Sequence[str], limit: int = 6) -> str:
    def one(t: NodeType) -> str:
        shown = {k: t.resources.get(k, 0.0) for k in keys if k not in UNSTATED_OK}
        shown.update({k: t.resources[k] for k in keys if k in UNSTATED_OK and k in t.resources})
        count = "no limit" if t.max_count is None else f"max {t.max_count}"
        return f"{t.label()} ({_fmt(shown)}; {count})"

    ranked = sorted(node_types, key=lambda t: -sum(t.resources.get(k, 0.0) for k in keys))
    text = "; ".join(one(t) for t in ranked[:limit])
    return text + (f"; and {len(ranked) - limit} more" if len(ranked) > limit else "")


def _growth(node_types: Sequence[NodeType], keys: Sequence[str]) -> dict[str, float]:
    """The most of each resource the autoscaler could add (inf: no limit or unstated)."""
    out = {}
    for k in keys:
        total = 0.0
        for t in node_types:
            have = t.resources.get(k, math.inf if k in UNSTATED_OK else 0.0)
            if have > 0:
                total += have * (math.inf if t.max_count is None else t.max_count)
        out[k] = total
    return out


def check_fits(
    options: Mapping[str, Mapping[str, Any]],
    cluster: Mapping[str, float],
    nodes: Sequence[Mapping[str, float]] | None = None,
    node_types: Sequence[NodeType] | None = None,
    may_grow: bool = False,
) -> None:
    """Raise `PlacementError` unless every deployment's minimum replicas fit in `cluster`
    together, and each replica fits on one node (`nodes`: each alive node's resources). A
    maximum that does not fit is only logged: the autoscaler then stops where the cluster ends.

    `node_types`: the node types the autoscaler can add (`growable_node_types`, or the app's
    `node_types` argument). A replica that fits only one of those is logged (Serve waits for the
    autoscaler to add that node), and the minimum replicas may use what the node types add (up
    to each type's `max_count`); an error names the node types too. `may_grow`: an autoscaler
    runs but its node types are unknown, so what fits no present node is only logged."""
    growable = list(node_types or [])
    at_min: dict[str, float] = {}
    at_max: dict[str, float] = {}
    parts = []
    for name, opts in options.items():
        lo, hi = replica_range(opts)
        need = _needs(opts)
        parts.append(
            f"{name} {lo}-{hi} x ({_fmt(need)})" if lo != hi else f"{name} {lo} x ({_fmt(need)})"
        )
        for k, v in need.items():
            at_min[k] = at_min.get(k, 0.0) + lo * v
            at_max[k] = at_max.get(k, 0.0) + hi * v
        if nodes is None or any(_holds(n, need, node_type=False) for n in nodes):
            continue
        fits = [t for t in growable if _holds(t.resources, need, node_type=True)]
        if fits:
            log.info(
                "no node has room for a %s replica (%s) yet: Serve waits while the autoscaler "
                "adds a node of type %s",
                name,
                _fmt(need),
                " or ".join(t.label() for t in fits),
            )
            continue
        if may_grow and not growable:
            log.warning(
                "no node has room for a %s replica (%s), and this cluster's autoscaler does not "
                "publish its node types (cluster/node_types.py), so whether it can ever add one "
                "is unknown: Serve waits for it. Give build_app `node_types` to check it here.",
                name,
                _fmt(need),
            )
            continue
        msg = (
            f"one {name} replica asks for {_fmt(need)}, and no node has that much "
            f"(nodes: {'; '.join(_fmt({k: n.get(k, 0) for k in need}) for n in nodes)})"
        )
        if growable:
            msg += (
                ", nor does any node type the autoscaler can add (node types, largest first: "
                f"{_fmt_types(growable, list(need))})"
            )
        raise PlacementError(msg)
    have = {k: float(v) for k, v in cluster.items() if k in at_min}
    grow = _growth(growable, list(at_max))
    can = {k: float(cluster.get(k, 0.0)) + grow.get(k, 0.0) for k in at_max}
    short = {k: v for k, v in at_min.items() if v > can[k] + EPS}
    if short and not (may_grow and not growable):
        grown = ""
        if growable:
            reach = {k: can[k] for k in at_min}
            grown = f" and can grow to {_fmt(reach)} with the node types its autoscaler can add"
        raise PlacementError(
            f"the app cannot be placed: its minimum replicas ask for {_fmt(at_min)} "
            f"({'; '.join(parts)}), and the cluster has {_fmt(have)} in all{grown}. Ask for "
            f"less (num_cpus / num_gpus / replicas per deployment) or give the cluster more."
        )
    now_short = {k: v for k, v in at_min.items() if v > cluster.get(k, 0.0) + EPS}
    if now_short:
        log.info(
            "the minimum replicas ask for %s and the cluster has %s now: Serve waits while the "
            "autoscaler adds nodes",
            _fmt(at_min),
            _fmt(have),
        )
    over = {k: v for k, v in at_max.items() if v > can[k] + EPS}
    if over:
        log.warning(
            "at their maximum replicas the deployments would ask for %s; the cluster has %s%s: "
            "autoscaling stops where the cluster ends",
            _fmt(at_max),
            _fmt(have),
            " and what its node types add" if growable else "",
        )
