"""The records every stage passes along: `Problem`, `Step`, and the annotation row's Arrow schema.

They are defined once, here, so that the annotation pipeline, the trainers, the server and the
evaluation read and write the same shapes (ARCHITECTURE.md, "Data contracts"). Records are frozen
dataclasses: a problem is a fact about a dataset, and nothing downstream should edit it in place.

Beyond the columns ARCHITECTURE.md lists, a row carries `style` (`socratic` or `cot`: which
prompt family wrote it), `cache_key` (a hash of everything that shaped the teacher call: prompt
text and version, model, sampling parameters, problem id, sample index; resume keys on it, so a
changed prompt is never served a stale answer), `attempts` (teacher calls made for the row, so
retries are counted from what is in the Parquet) and `answer_kind` (the problem's: a custom
dataset's choice letters or short texts must be read and compared as such by every later stage).

One naming note: an annotation row carries two step lists. `steps` holds the decomposition that
row is *about* (the teacher's, or the dataset's own in `--mode gold`), and `gold_steps` holds the
dataset's human decomposition of the problem, kept beside it so that nothing the dataset offered is
lost when a teacher's steps are written.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from socratic.answers import ANSWER_KINDS

ACCEPTED = "accepted"
REJECTED = "rejected"
STATUSES = (ACCEPTED, REJECTED)

YES_NO = ("yes", "no")


@dataclass(frozen=True, slots=True)
class Step:
    """One sub-question and its answer."""

    question: str
    answer: str

    def to_dict(self) -> dict[str, str]:
        return {"question": self.question, "answer": self.answer}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Step:
        return cls(question=str(data["question"]), answer=str(data["answer"]))


def steps_from(items: Iterable[Step | Mapping[str, Any]] | None) -> tuple[Step, ...]:
    """Accept steps as records or as the dicts Parquet and JSON give back."""
    if items is None:
        return ()
    return tuple(s if isinstance(s, Step) else Step.from_dict(s) for s in items)


@dataclass(frozen=True, slots=True)
class Problem:
    """A dataset problem with its gold answer, as every dataset adapter yields it.

    `id` is stable across runs (`gsm8k/test/17`): resuming an annotation job and joining
    predictions to gold both key on it. `answer` is the normalised gold answer text
    (`socratic.answers.normalize_answer`), e.g. "1234.5" or "yes". `answer_kind` says how to
    read and compare answers (`socratic.answers.ANSWER_KINDS`); a custom dataset states it, and
    left empty it is inferred as before kinds were stated: `yesno` for a yes/no answer, else
    `number` (so rows written before the field existed read back the same).
    """

    id: str
    dataset: str
    split: str
    question: str
    answer: str
    solution: str | None = None
    steps: tuple[Step, ...] = field(default=())
    answer_kind: str = ""

    def __post_init__(self) -> None:
        if not self.answer_kind:
            inferred = "yesno" if self.answer in YES_NO else "number"
            object.__setattr__(self, "answer_kind", inferred)
        elif self.answer_kind not in ANSWER_KINDS:
            raise ValueError(
                f"{self.id}: answer_kind must be one of {', '.join(ANSWER_KINDS)}, "
                f"not {self.answer_kind!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "dataset": self.dataset,
            "split": self.split,
            "question": self.question,
            "answer": self.answer,
            "solution": self.solution,
            "steps": [s.to_dict() for s in self.steps],
            "answer_kind": self.answer_kind,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Problem:
        return cls(
            id=str(data["id"]),
            dataset=str(data["dataset"]),
            split=str(data["split"]),
            question=str(data["question"]),
            answer=str(data["answer"]),
            solution=data.get("solution"),
            steps=steps_from(data.get("steps")),
            answer_kind=data.get("answer_kind") or "",
        )


STEP_TYPE = pa.struct([("question", pa.string()), ("answer", pa.string())])

#: One row per (problem, teacher sample); ARCHITECTURE.md "Annotation row".
ANNOTATION_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("answer", pa.string(), nullable=False),
        pa.field("solution", pa.string()),
        pa.field("gold_steps", pa.list_(STEP_TYPE), nullable=False),
        pa.field("sample", pa.int32(), nullable=False),
        pa.field("teacher", pa.string(), nullable=False),
        pa.field("prompt_version", pa.string(), nullable=False),
        pa.field("style", pa.string(), nullable=False),
        pa.field("cache_key", pa.string(), nullable=False),
        pa.field("steps", pa.list_(STEP_TYPE), nullable=False),
        pa.field("predicted", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("prompt_tokens", pa.int64(), nullable=False),
        pa.field("completion_tokens", pa.int64(), nullable=False),
        pa.field("attempts", pa.int32(), nullable=False),
        pa.field("raw", pa.string()),
        # null | "ok" | "repaired": the teacher's <<expr=value>> spans re-evaluated (annotate.py)
        pa.field("step_check", pa.string()),
        # hash of the sub-questions: equal within a problem = the same decomposition sampled again
        pa.field("decomposition", pa.string()),
        # the problem's answer kind (number, yesno, choice, text): how `predicted` was read and
        # compared; null in rows written before it existed (read back as inferred)
        pa.field("answer_kind", pa.string()),
    ]
)


def annotation_row(
    problem: Problem,
    *,
    sample: int,
    teacher: str,
    prompt_version: str,
    style: str,
    cache_key: str,
    steps: Iterable[Step],
    predicted: str | None,
    status: str,
    reason: str | None = None,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    attempts: int = 0,
    raw: str | None = None,
    step_check: str | None = None,
    decomposition: str | None = None,
) -> dict[str, Any]:
    """Build one annotation row as a dict matching `ANNOTATION_SCHEMA`.

    Checking status/reason here means a row that says "rejected" always says why, so a user
    can count rejections by reason instead of guessing.
    """
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    if status == REJECTED and not reason:
        raise ValueError(f"rejected row for {problem.id!r} needs a reason")
    row = problem.to_dict()
    row["gold_steps"] = row.pop("steps")
    row.update(
        sample=int(sample),
        teacher=teacher,
        prompt_version=prompt_version,
        style=style,
        cache_key=cache_key,
        steps=[s.to_dict() for s in steps],
        predicted=predicted,
        status=status,
        reason=reason,
        prompt_tokens=int(prompt_tokens),
        completion_tokens=int(completion_tokens),
        attempts=int(attempts),
        raw=raw,
        step_check=step_check,
        decomposition=decomposition,
    )
    return row


def annotation_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows -> a table with exactly `ANNOTATION_SCHEMA` (column order and types)."""
    return pa.Table.from_pylist(list(rows), schema=ANNOTATION_SCHEMA)


# Nullable columns the row gained after its first release: Parquet written before them reads as
# null there (`conform_annotations`), so an old output can be resumed and trained on.
ADDED_COLUMNS = ("step_check", "decomposition", "answer_kind")


def check_annotation_schema(schema: pa.Schema, source: str) -> None:
    """Raise a clear error when a Parquet file is not an annotation table.

    Readers call this before training on a file so a wrong path or an old schema fails with the
    file and the missing or mistyped columns named, not deep inside tokenisation. A column of
    `ADDED_COLUMNS` may be missing: it is older Parquet, not another table.
    """
    problems = []
    for expected in ANNOTATION_SCHEMA:
        idx = schema.get_field_index(expected.name)
        if idx < 0 and expected.name in ADDED_COLUMNS:
            continue
        if idx < 0:
            problems.append(f"missing column {expected.name!r}")
        elif not schema.field(idx).type.equals(expected.type):
            problems.append(
                f"column {expected.name!r} has type {schema.field(idx).type}, "
                f"expected {expected.type}"
            )
    if problems:
        raise ValueError(f"{source}: not an annotation table: " + "; ".join(problems))


def conform_annotations(table: pa.Table, source: str) -> pa.Table:
    """`table` in `ANNOTATION_SCHEMA`'s columns and order, with `ADDED_COLUMNS` it lacks as nulls
    (the migration of Parquet written before them); any other difference raises as
    `check_annotation_schema` does."""
    check_annotation_schema(table.schema, source)
    columns = [
        table.column(f.name) if f.name in table.column_names else pa.nulls(len(table), f.type)
        for f in ANNOTATION_SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=ANNOTATION_SCHEMA)


def problem_from_row(row: Mapping[str, Any]) -> Problem:
    """The Problem an annotation row was made from (its gold fields)."""
    return Problem(
        id=row["id"],
        dataset=row["dataset"],
        split=row["split"],
        question=row["question"],
        answer=row["answer"],
        solution=row.get("solution"),
        steps=steps_from(row.get("gold_steps")),
        answer_kind=row.get("answer_kind") or "",
    )
