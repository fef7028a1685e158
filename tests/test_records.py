"""The annotation-row schema is defined once and round-trips through real Parquet."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from socratic.records import (
    ACCEPTED,
    ANNOTATION_SCHEMA,
    REJECTED,
    Problem,
    Step,
    annotation_row,
    annotation_table,
    check_annotation_schema,
    problem_from_row,
)

PROBLEM = Problem(
    id="gsm8k/test/17",
    dataset="gsm8k",
    split="test",
    question="Ann has 3 bags of 4 apples. How many apples?",
    answer="12",
    solution="3*4=<<3*4=12>>12",
    steps=(Step("How many apples?", "3*4=<<3*4=12>>12"),),
)


def test_problem_dict_round_trip() -> None:
    assert Problem.from_dict(PROBLEM.to_dict()) == PROBLEM
    assert PROBLEM.answer_kind == "number"
    assert Problem("s/x/0", "s", "x", "Is it?", "no").answer_kind == "yesno"


def test_rows_round_trip_through_parquet(tmp_path: Path) -> None:
    teacher_steps = [Step("How many per bag?", "4"), Step("How many apples?", "3*4 = 12")]
    rows = [
        annotation_row(
            PROBLEM,
            sample=0,
            teacher="gpt-x",
            prompt_version="socratic-v1",
            style="socratic",
            cache_key="k0",
            steps=teacher_steps,
            predicted="12",
            status=ACCEPTED,
            prompt_tokens=120,
            completion_tokens=30,
            raw="Q1: ...",
        ),
        annotation_row(
            PROBLEM,
            sample=1,
            teacher="gpt-x",
            prompt_version="socratic-v1",
            style="socratic",
            cache_key="k1",
            steps=[],
            predicted=None,
            status=REJECTED,
            reason="api_error: 500",
        ),
    ]
    pq.write_table(annotation_table(rows), tmp_path / "part-0.parquet")
    back = pq.read_table(tmp_path / "part-0.parquet")
    assert back.schema.equals(ANNOTATION_SCHEMA)
    check_annotation_schema(back.schema, "part-0.parquet")
    got = back.to_pylist()
    assert got[0]["steps"] == [s.to_dict() for s in teacher_steps]
    assert got[0]["gold_steps"] == [PROBLEM.steps[0].to_dict()]
    assert (got[1]["status"], got[1]["reason"], got[1]["predicted"]) == (
        REJECTED,
        "api_error: 500",
        None,
    )
    assert problem_from_row(got[0]) == PROBLEM


def test_rejected_rows_must_say_why() -> None:
    with pytest.raises(ValueError, match="needs a reason"):
        annotation_row(
            PROBLEM,
            sample=0,
            teacher="t",
            prompt_version="v",
            style="socratic",
            cache_key="k",
            steps=[],
            predicted=None,
            status=REJECTED,
        )
    with pytest.raises(ValueError, match="status must be one of"):
        annotation_row(
            PROBLEM,
            sample=0,
            teacher="t",
            prompt_version="v",
            style="socratic",
            cache_key="k",
            steps=[],
            predicted=None,
            status="maybe",
        )


def test_schema_check_names_the_file_and_columns() -> None:
    wrong = pa.schema([("id", pa.string()), ("sample", pa.string())])
    with pytest.raises(ValueError, match=r"^x\.parquet: not an annotation table: ") as err:
        check_annotation_schema(wrong, "x.parquet")
    assert "missing column 'status'" in str(err.value)
    assert "column 'sample' has type string, expected int32" in str(err.value)
