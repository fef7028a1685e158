"""Annotation Parquet for tests: built from a dataset's own gold steps (training data without
running the pipeline), and the config and read-back the annotation tests share."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from socratic.records import (
    ACCEPTED,
    ANNOTATION_SCHEMA,
    Problem,
    annotation_row,
    annotation_table,
)


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


def sample_config(tmp_path: Path, server: Any, **kw: Any) -> Any:
    """An `AnnotateConfig` for the bundled sample against a local test teacher `server`."""
    from pipelines.annotate import AnnotateConfig

    base = dict(
        dataset="sample",
        split="all",
        output=str(tmp_path / "out"),
        base_url=server.base_url,
        model="test-teacher",
        retry_base=0.01,
        timeout=5.0,
        max_in_flight=8,
    )
    return AnnotateConfig(**{**base, **kw})


def read_annotation_rows(output: str) -> list[dict]:
    """Every row under `output`, each file checked against the annotation schema."""
    from pipelines.annotate import parquet_files
    from pipelines.journal import output_fs

    fs, root = output_fs(output)
    files = parquet_files(fs, root)
    assert files, f"no parquet under {output}"
    for f in files:
        assert pq.read_schema(f).equals(ANNOTATION_SCHEMA)
    return [r for f in files for r in pq.read_table(f).to_pylist()]
