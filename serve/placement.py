"""Size the app's replicas to the cluster it joins, and refuse an app that cannot be placed.

Why: Serve places a replica only where its `ray_actor_options` fit, and one that fits nowhere
waits for ever ("total resources available: {}" every 30 s; measured on Ray 2.60 with two 1-CPU
model replicas and a 0.1-CPU ingress on 2 CPUs). So a deployment that states no CPUs gets a
share of the cluster's CPUs (`size_to_cluster`): a little for the ingress, the rest split
between every model replica the autoscalers may start. A deployment that states its resources is
checked (`check_fits`): if its minimum replicas cannot all be placed, the app fails at once with
a `PlacementError` naming what it asked for and what the cluster has.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

MODELS = ("Decomposer", "Solver")
INGRESS = "Ingress"
INGRESS_CPUS = 0.1  # the ingress holds no model: a little CPU for HTTP and the loop
MAX_MODEL_CPUS = 1.0  # more logical CPUs per replica than torch's threads would use is waste


class PlacementError(RuntimeError):
    """The app asks for more than the cluster has."""


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


def size_to_cluster(
    options: Mapping[str, Mapping[str, Any]], cluster: Mapping[str, float]
) -> dict[str, dict[str, Any]]:
    """Options per deployment (`Decomposer`, `Solver`, `Ingress`) with `num_cpus` filled in
    where the caller gave none, so that every replica at its maximum count fits in `cluster`
    (`ray.cluster_resources()`). Stated values are kept as given."""
    out = {name: copy.deepcopy(dict(options.get(name, {}))) for name in (*MODELS, INGRESS)}
    actor = {name: out[name].setdefault("ray_actor_options", {}) for name in out}
    cpus = float(cluster.get("CPU", 0.0))
    ingress_max = replica_range(out[INGRESS])[1]
    if "num_cpus" not in actor[INGRESS]:
        actor[INGRESS]["num_cpus"] = max(0.01, _floor(min(INGRESS_CPUS, 0.05 * cpus / ingress_max)))
    fixed = replica_range(out[INGRESS])[1] * actor[INGRESS]["num_cpus"]
    free_slots = 0
    for name in MODELS:
        n = replica_range(out[name])[1]
        if "num_cpus" in actor[name]:
            fixed += n * actor[name]["num_cpus"]
        else:
            free_slots += n
    if free_slots:
        share = _floor(min(MAX_MODEL_CPUS, max(cpus - fixed, 0.0) / free_slots))
        for name in MODELS:
            actor[name].setdefault("num_cpus", max(share, 0.01))
    return out


def _needs(options: Mapping[str, Any]) -> dict[str, float]:
    actor = options.get("ray_actor_options", {})
    need = {"CPU": float(actor.get("num_cpus", 1.0)), "GPU": float(actor.get("num_gpus", 0.0))}
    for k, v in (actor.get("resources") or {}).items():
        need[k] = need.get(k, 0.0) + float(v)
    return {k: v for k, v in need.items() if v > 0}


def _fmt(resources: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items())) or "nothing"


def check_fits(
    options: Mapping[str, Mapping[str, Any]],
    cluster: Mapping[str, float],
    nodes: list[Mapping[str, float]] | None = None,
) -> None:
    """Raise `PlacementError` unless every deployment's minimum replicas fit in `cluster`
    together, and each replica fits on one node (`nodes`: each alive node's resources). A
    maximum that does not fit is only logged: the autoscaler then stops where the cluster ends."""
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
        if nodes is not None and not any(
            all(node.get(k, 0.0) + 1e-9 >= v for k, v in need.items()) for node in nodes
        ):
            raise PlacementError(
                f"one {name} replica asks for {_fmt(need)}, and no node has that much "
                f"(nodes: {'; '.join(_fmt({k: n.get(k, 0) for k in need}) for n in nodes)})"
            )
    have = {k: float(v) for k, v in cluster.items() if k in at_min}
    short = {k: v for k, v in at_min.items() if v > cluster.get(k, 0.0) + 1e-9}
    if short:
        raise PlacementError(
            f"the app cannot be placed: its minimum replicas ask for {_fmt(at_min)} "
            f"({'; '.join(parts)}), and the cluster has {_fmt(have)} in all. Ask for less "
            f"(num_cpus / num_gpus / replicas per deployment) or give the cluster more."
        )
    over = {k: v for k, v in at_max.items() if v > cluster.get(k, 0.0) + 1e-9}
    if over:
        log.warning(
            "at their maximum replicas the deployments would ask for %s; the cluster has %s: "
            "autoscaling stops where the cluster ends",
            _fmt(at_max),
            _fmt(have),
        )
