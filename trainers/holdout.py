"""Hold problems out for evaluation, by problem, never by example.

A problem gives several examples (one per teacher sample, and the per-sub-question solver
examples); splitting examples would put the same problem on both sides and make the eval loss a
training loss. The split is a pure function of (problem ids, fraction, seed), so every worker
and the driver compute the same one alone, and a resumed run evaluates on the same problems.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

Row = Mapping[str, Any]


def _rank(problem_id: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{problem_id}".encode()).hexdigest()


def split_by_problem(
    rows: Sequence[Row], fraction: float, seed: int
) -> tuple[list[Row], list[Row]]:
    """(train rows, eval rows): `fraction` of the distinct problem ids, at least one, held out."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--eval-fraction must be between 0 and 1 (exclusive); got {fraction}")
    ids = sorted({r["id"] for r in rows}, key=lambda i: _rank(i, seed))
    if len(ids) < 2:
        raise ValueError(f"--eval-fraction needs at least 2 problems; the data has {len(ids)}")
    held = set(ids[: max(1, round(fraction * len(ids)))])
    return [r for r in rows if r["id"] not in held], [r for r in rows if r["id"] in held]


def without_problems(rows: Sequence[Row], held: Sequence[Row]) -> tuple[list[Row], int]:
    """Training rows minus every problem that is in `held` (`--eval-data`), and how many went."""
    ids = {r["id"] for r in held}
    kept = [r for r in rows if r["id"] not in ids]
    return kept, len(rows) - len(kept)
