"""The journal and the step checks without Ray: rows survive a cut, wrong steps are found."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from pipelines.annotate import prepare_output
from pipelines.journal import Journal, journal_files, output_fs
from pipelines.prompting import check_steps, decomposition_id
from socratic.adapters import DatasetSpec, load_problems
from socratic.records import ANNOTATION_SCHEMA, Step, annotation_row

SAMPLE = list(load_problems(DatasetSpec("sample", split="all")))


def _row(i: int, **kw) -> dict:
    p = SAMPLE[i]
    base = dict(
        sample=0, teacher="t", prompt_version="v", style="socratic", cache_key=f"key-{i}",
        steps=p.steps, predicted=p.answer, status="accepted",
    )  # fmt: skip
    return annotation_row(p, **{**base, **kw})


def test_a_journal_cut_mid_line_compacts_into_parquet_and_keeps_every_whole_row(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    journal = Journal(str(out))
    for i in range(3):
        journal.add(_row(i))
    journal.add(_row(3, status="rejected", reason="api_error: 429: slow down", steps=()))
    journal.close()
    (path,) = journal_files(*output_fs(str(out)))
    with open(path, "a") as f:  # what a kill -9 in the middle of a write leaves
        f.write(json.dumps(_row(4))[:50])
    state = prepare_output(*output_fs(str(out)))
    assert len(state.done) == 3 and all(f"key-{i}" in state.done for i in range(3))
    assert "key-3" not in state.done and state.journal_rows_recovered == 3
    assert state.transient_rows_dropped == 1  # asked again, like a transient row in Parquet
    assert not journal_files(*output_fs(str(out)))
    (compacted,) = out.glob("journal-*.parquet")
    table = pq.read_table(compacted)
    assert table.schema.equals(ANNOTATION_SCHEMA) and table.num_rows == 3
    # A second compaction of the same answers (a journal and Parquet both holding them) adds none.
    journal = Journal(str(out))
    journal.add(_row(0))
    journal.close()
    assert prepare_output(*output_fs(str(out))).journal_rows_recovered == 0


def test_step_check_finds_and_repairs_a_wrong_intermediate_result() -> None:
    good = [Step("How many?", "2 * 3 = <<2*3=6>>6 apples."), Step("Total?", "<<6+1=7>>7")]
    assert check_steps(good) == (0, tuple(good))
    bad = [good[0], Step("Total?", "6 + 1 = <<6+1=8>>8")]
    wrong, fixed = check_steps(bad)
    assert wrong == 1 and fixed[1].answer == "6 + 1 = <<6+1=7>>7" and fixed[0] == good[0]
    # Formatting is not an error, and a span the calculator refuses is left alone.
    assert check_steps([Step("q", "<<7/2=3.50>>3.50 and <<x=y>>")])[0] == 0


def test_decomposition_id_is_the_sub_questions_only() -> None:
    a = [Step("How many apples?", "3"), Step("How many left?", "1")]
    b = [Step("how many  apples?", "4"), Step("How many left?", "2")]
    assert decomposition_id(a) == decomposition_id(b)
    assert decomposition_id(a) != decomposition_id(a[:1]) and decomposition_id([]) is None
