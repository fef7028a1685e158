"""The hand-labelled corpus of real model outputs and the benchmark that reads it.

`tests/data/extraction_corpus.jsonl`: outputs of a small instruct model on GSM8K test
problems, each with the final answer a human grader reads in it (see
`benchmarks/extraction_agreement.py`). These tests check the corpus's shape and that the
benchmark's figures are consistent with each other; they encode no agreement target, which
is the benchmark's to report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.extraction_agreement import DEFAULT_CORPUS, FIELDS, main, read_corpus
from socratic.answers import extract_answer, normalize_answer


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return read_corpus(DEFAULT_CORPUS)


def test_corpus_has_60_labelled_outputs_and_nothing_else(rows: list[dict]) -> None:
    assert len(rows) == 60
    assert len({r["id"] for r in rows}) == 60
    for r in rows:
        assert set(r) == set(FIELDS), r["id"]  # no gold answer, no problem statement
        assert isinstance(r["text"], str) and r["text"].strip()
        assert r["note"] is None or (isinstance(r["note"], str) and r["note"])
        if r["label"] is not None:  # a number, written canonically
            assert normalize_answer(r["label"], "number") == r["label"], r["id"]


def test_benchmark_figures_are_consistent(tmp_path: Path, rows: list[dict]) -> None:
    out = tmp_path / "agreement.json"
    assert main(["--json", str(out)]) == 0
    fig = json.loads(out.read_text())
    n = fig["outputs"]
    assert n == len(rows)
    assert fig["agreed"] + len(fig["disagreements"]) == n
    assert fig["agreement_pct"] == round(100 * fig["agreed"] / n, 1)
    lo, hi = fig["agreement_ci95_pct"]
    assert lo <= fig["agreement_pct"] <= hi
    extracted = {r["id"]: extract_answer(r["text"], "number") for r in rows}
    assert fig["extraction_failures"] == sum(v is None for v in extracted.values())
    assert fig["human_none"] == sum(r["label"] is None for r in rows)
    assert sum(fig["disagreement_kinds"].values()) == len(fig["disagreements"])
    labels = {r["id"]: r["label"] for r in rows}
    for d in fig["disagreements"]:
        assert d["label"] == labels[d["id"]]
        assert d["extracted"] == extracted[d["id"]]
        assert len(d["excerpt"]) <= 123  # "..." + 120 characters


def test_benchmark_counts_on_a_small_corpus(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    rows = [
        {"id": "a", "text": "So the answer is $1,200.", "label": "1200", "note": None},
        {"id": "b", "text": "No number here.", "label": None, "note": None},
        {"id": "c", "text": "3 + 4 = 7 and then 7 * 2 =", "label": None, "note": "cut off"},
        {"id": "d", "text": "The answer is 0.50", "label": "0.5", "note": None},
    ]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "agreement.json"
    assert main(["--corpus", str(corpus), "--json", str(out)]) == 0
    fig = json.loads(out.read_text())
    assert (fig["outputs"], fig["agreed"], fig["agreement_pct"]) == (4, 3, 75.0)
    assert (fig["extraction_failures"], fig["human_none"]) == (1, 2)
    assert [(d["id"], d["label"], d["extracted"]) for d in fig["disagreements"]] == [
        ("c", None, "2")
    ]
    assert fig["disagreement_kinds"] == {"extractor answered, human none": 1}


def test_corpus_row_missing_a_field_is_refused(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "a", "text": "5", "label": "5"}) + "\n")
    with pytest.raises(ValueError, match="note"):
        read_corpus(corpus)


def test_output_cut_off_right_after_its_answer_marker_has_no_answer(rows: list[dict]) -> None:
    # Regression: the extractor used to fall back to the last number (80, a step).
    row = next(r for r in rows if r["id"] == "gsm8k/test/35")
    assert row["text"].rstrip().endswith("So, the answer is")
    assert extract_answer(row["text"], "number") is None
