"""Annotation Parquet built from a dataset's own gold steps, for tests and benchmarks that need
training data without running the annotation pipeline."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pyarrow.parquet as pq

from socratic.records import ACCEPTED, Problem, annotation_row, annotation_table


def write_gold_annotations(
    problems: Iterable[Problem], out_dir: Path, status: str = ACCEPTED
) -> Path:
    """One row per problem with its gold steps (rejected rows say `wrong_answer`); returns the
    folder, which holds a single `part-0.parquet`."""
    rows = [
        annotation_row(
            p, sample=0, teacher="gold", prompt_version="gold", style="socratic",
            cache_key=p.id, steps=p.steps, predicted=p.answer, status=status,
            reason=None if status == ACCEPTED else "wrong_answer",
        )
        for p in problems
    ]  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(annotation_table(rows), out_dir / "part-0.parquet")
    return out_dir
