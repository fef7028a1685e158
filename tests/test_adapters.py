"""Dataset adapters: the real files in ../shared/data load 100 %, local formats agree, bad
records fail with file, line and field named."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from socratic.adapters import DatasetRecordError, DatasetSpec, load_problems, sample_path
from socratic.answers import answers_match, extract_answer
from socratic.records import Problem
from tests.support.paths import require_shared


def _load(name: str, split: str, path: Path | str | None = None, **kw) -> list[Problem]:
    return list(
        load_problems(DatasetSpec(name, split=split, path=str(path) if path else None, **kw))
    )


# --- the real datasets -----------------------------------------------------------------------


@pytest.mark.shared_data
@pytest.mark.parametrize(("split", "n"), [("train", 7473), ("test", 1319)])
@pytest.mark.parametrize("config", ["main", "socratic"])
def test_gsm8k_loads_every_record(split: str, n: int, config: str) -> None:
    suffix = "_socratic" if config == "socratic" else ""
    spec = DatasetSpec(
        "gsm8k", split=split, path=str(require_shared(f"gsm8k/{split}{suffix}.jsonl"))
    )
    problems, stats = list(load_problems(spec)), spec.stats
    assert len(problems) == n
    assert [p.id for p in problems[:2]] == [f"gsm8k/{split}/0", f"gsm8k/{split}/1"]
    assert len({p.id for p in problems}) == n
    assert all(p.question and p.answer and p.solution for p in problems)
    assert all("####" not in p.solution for p in problems)
    if config == "main":
        assert all(not p.steps for p in problems)
        return
    assert all(p.steps for p in problems)  # every record parses into steps
    if split == "train":  # upstream line 481 has one "q ** " line with no answer: left out, counted
        assert stats.unanswered_steps_dropped >= 1
    # The last step's number is the #### answer: report the fraction (expected ~100 %).
    matched = sum(answers_match(extract_answer(p.steps[-1].answer), p.answer) for p in problems)
    print(
        f"\ngsm8k socratic {split}: last step == #### answer for {matched}/{n} "
        f"({matched / n:.2%}); steps per problem {sum(len(p.steps) for p in problems) / n:.2f}; "
        f"empty sub-answers left out {stats.unanswered_steps_dropped}"
    )
    assert matched / n >= 0.985  # measured 99.0 % (train) and 99.2 % (test); the rest is noisy gold


@pytest.mark.shared_data
def test_gsm8k_socratic_and_main_are_the_same_problems() -> None:
    main = _load("gsm8k", "test", require_shared("gsm8k/test.jsonl"))
    soc = _load("gsm8k", "test", require_shared("gsm8k/test_socratic.jsonl"))
    assert [(p.id, p.question, p.answer) for p in main] == [
        (p.id, p.question, p.answer) for p in soc
    ]


@pytest.mark.shared_data
def test_svamp_loads_every_record_with_a_seeded_split() -> None:
    path = require_shared("svamp/SVAMP.json")
    train, test = _load("svamp", "train", path), _load("svamp", "test", path)
    assert (len(train), len(test)) == (700, 300)
    assert not {p.id.split("/")[-1] for p in train} & {p.id.split("/")[-1] for p in test}
    assert _load("svamp", "test", path) == test  # same seed, same split
    assert [p.id for p in _load("svamp", "test", path, seed=1)] != [p.id for p in test]
    everything = _load("svamp", "all", path, holdout=0)
    assert len(everything) == 1000
    first = everything[0]
    assert first.id == "svamp/all/chal-1"
    assert first.question == (
        "Each pack of dvds costs 76 dollars. If there is a discount of 25 "
        "dollars on each pack How much do you have to pay to buy each pack?"
    )
    assert (first.answer, first.solution) == ("51", "( 76.0 - 25.0 ) = 51")


@pytest.mark.shared_data
def test_svamp_masked_csv_is_unmasked() -> None:
    problems = _load("svamp", "dev", require_shared("svamp/mawps-asdiv-a_svamp/dev.csv"))
    assert len(problems) == 1000
    assert not any("number0" in p.question for p in problems)
    assert problems[0].question.startswith("julia played tag with 18 kids on monday")
    assert problems[0].answer == "8"


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("file", "split", "n"),
    [
        ("train.json", "train", 2061),
        ("dev.json", "dev", 229),
        ("strategyqa_train.json", "train", 2290),
    ],
)
def test_strategyqa_loads_every_record(file: str, split: str, n: int) -> None:
    spec = DatasetSpec("strategyqa", split=split, path=str(require_shared(f"strategyqa/{file}")))
    problems = list(load_problems(spec))
    assert len(problems) == n
    assert {p.answer for p in problems} == {"yes", "no"}
    assert all(p.answer_kind == "yesno" and p.steps for p in problems)
    # The last gold step ends in the gold answer, so gold steps verify like teacher steps do.
    assert all(extract_answer(p.steps[-1].answer, "yesno") == p.answer for p in problems)
    print(
        f"\nstrategyqa {file}: {n} problems, "
        f"{sum(len(p.steps) for p in problems) / n:.2f} steps each, "
        f"{spec.stats.unanswered_steps_dropped} sub-questions without a fact left out"
    )


@pytest.mark.shared_data
def test_strategyqa_steps_pair_decomposition_with_facts() -> None:
    (genghis,) = [
        p
        for p in _load("strategyqa", "train", require_shared("strategyqa/train.json"))
        if p.id == "strategyqa/train/2bc9c4f9c19c167187f2"
    ]
    assert genghis.answer == "yes"
    assert [s.question for s in genghis.steps] == [
        "How many kids did Julius Caesar have?",
        "How many kids did Genghis Khan have?",
        "Is #2 greater than #1?",
    ]
    assert genghis.steps[0].answer == "Julius Caesar had three children."
    assert genghis.steps[2].answer.endswith("to Genghis Khan. So the answer is yes.")


# --- local formats, ids, limits ---------------------------------------------------------------

GSM8K_ROWS = [
    {
        "question": "Ann has 3 bags of 4 apples. How many apples?",
        "answer": "How many apples? ** She has 3*4=<<3*4=12>>12 apples.\n#### 12",
    },
    {
        "question": "Bo has $1,200 and spends half.  How much is left?",
        "answer": "How much is left? ** 1200/2=<<1200/2=600>>600\n#### 600",
    },
]


def _write(tmp_path: Path, fmt: str, rows: list[dict]) -> Path:
    path = tmp_path / f"train_socratic.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        import csv

        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_every_local_format_reads_the_same(tmp_path: Path, fmt: str) -> None:
    problems = _load("gsm8k", "train", _write(tmp_path, fmt, GSM8K_ROWS))
    assert [p.id for p in problems] == ["gsm8k/train/0", "gsm8k/train/1"]
    assert problems[1].question == "Bo has $1,200 and spends half. How much is left?"
    assert problems[1].answer == "600"
    assert problems[0].steps[0].question == "How many apples?"
    assert problems[0].solution == "She has 3*4=<<3*4=12>>12 apples."


def test_limit_and_config(tmp_path: Path) -> None:
    path = _write(tmp_path, "jsonl", GSM8K_ROWS)
    assert len(_load("gsm8k", "train", path, limit=1)) == 1
    main = _load("gsm8k", "train", path, config="main")
    assert not main[0].steps and "**" in main[0].solution


def test_hub_path_through_datasets_load_dataset(tmp_path: Path) -> None:
    """With no file, adapters call `datasets.load_dataset(hub_id, config, split=...)`; a local
    directory laid out like the hub repo takes the same path offline."""
    repo = tmp_path / "gsm8k-repo"
    (repo / "socratic").mkdir(parents=True)
    (repo / "socratic" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS))
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: socratic\n  data_files:\n"
        "  - split: test\n    path: socratic/test.jsonl\n---\n"
    )
    problems = _load("gsm8k", "test", hub_id=str(repo), config="socratic")
    assert [p.answer for p in problems] == ["12", "600"]
    assert problems[0].steps


def test_sample_is_bundled_and_split() -> None:
    assert sample_path().is_file()
    train, test = _load("sample", "train"), _load("sample", "test")
    assert (len(train), len(test)) == (32, 8)
    assert train[0].id == "sample/train/0" and test[0].id == "sample/test/0"
    assert len(_load("sample", "all")) == 40


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "field", "why"),
    [
        ('{"question": "q?"}', "answer", "missing"),
        ('{"question": "", "answer": "x\\n#### 3"}', "question", "empty"),
        ('{"question": 5, "answer": "x\\n#### 3"}', "question", "expected str, got int"),
        ('{"question": "q?", "answer": "no final line"}', "answer", "no '#### <final answer>'"),
        ('{"question": "q?", "answer": "x\\n#### many"}', "answer", "expected a number"),
        (
            '{"question": "q?", "answer": "a ** b\\nno separator\\n#### 3"}',
            "answer",
            "solution line 2",
        ),
        ('{"question": "q?", ', "<json>", "not JSON"),
    ],
)
def test_malformed_record_names_file_line_and_field(
    tmp_path: Path, line: str, field: str, why: str
) -> None:
    path = tmp_path / "test_socratic.jsonl"
    path.write_text(json.dumps(GSM8K_ROWS[0]) + "\n\n" + line + "\n")
    with pytest.raises(DatasetRecordError, match=why) as err:
        _load("gsm8k", "test", path)
    assert str(err.value).startswith(f"{path}: line 3: field {field!r}: ")
    assert (err.value.source, err.value.where, err.value.field_name) == (str(path), "line 3", field)


def test_malformed_records_in_other_formats(tmp_path: Path) -> None:
    svamp = tmp_path / "svamp.json"
    svamp.write_text(
        json.dumps(
            [
                {"ID": "a", "Body": "b", "Question": "q", "Answer": 1.0},
                {"ID": "b", "Body": "b", "Question": "q"},
            ]
        )
    )
    with pytest.raises(DatasetRecordError, match=r"record 2: field 'Answer': missing"):
        _load("svamp", "all", svamp, holdout=0)
    sqa = tmp_path / "dev.json"
    sqa.write_text(json.dumps([{"qid": "x", "question": "Is it?", "answer": "maybe"}]))
    with pytest.raises(DatasetRecordError, match=r"record 1: field 'answer': .*maybe"):
        _load("strategyqa", "dev", sqa)
    bad_csv = tmp_path / "dev.csv"
    bad_csv.write_text("Question,Numbers,Answer\nnumber0 and number1 ?,7,9.0\n")
    with pytest.raises(
        DatasetRecordError, match=r"line 2: field 'Numbers': has no value for number1"
    ):
        _load("svamp", "dev", bad_csv)


def test_missing_file_and_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        _load("gsm8k", "test", tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="unknown dataset 'mmlu'"):
        _load("mmlu", "test")
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        (tmp_path / "a.txt").write_text("x")
        _load("gsm8k", "test", tmp_path / "a.txt")
