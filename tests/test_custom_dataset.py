"""`--dataset custom`: the user's own files, one per answer kind, through every stage's reading
path: loading and ids, bad records (named, or skipped and counted), the options as flags and
YAML, the teacher prompt and the judge per kind, and one annotation run against the test
teacher. Every file here is written by the test itself (never a copy of the shared data)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.annotate_config import AnnotateConfig
from pipelines.evaluate import EvaluateConfig
from pipelines.judging import verdict_fields
from pipelines.prompting import Prompt, judge
from socratic.adapters import (
    CustomFields,
    DatasetRecordError,
    DatasetSpec,
    load_problems,
    load_stats,
)
from socratic.config import parse_config
from socratic.records import Problem, annotation_row, problem_from_row

# --- the files: each kind with its own column names ------------------------------------------

NUMBER_ROWS = [  # csv; steps as GSM8K Socratic lines, a solution column
    {
        "Frage": "Ana has 3 bags of 4 apples. How many apples does she have?",
        "Ergebnis": "12",
        "Weg": "3*4 = 12",
        "Schritte": "How many apples are in the bags? ** She has 3*4 = <<3*4=12>>12 apples.",
    },
    {
        "Frage": "A shop sells 1,200 pens and then 300 more. How many pens does it sell?",
        "Ergebnis": "$1,500",
        "Weg": "1200+300 = 1500",
        "Schritte": "How many pens before? ** 1,200 pens.\n"
        "How many pens in all? ** It sells 1200+300 = <<1200+300=1500>>1500 pens.",
    },
]
YESNO_ROWS = [  # jsonl; an id field; answers as booleans and as words
    {"uid": "q-7", "query": "Is 7 larger than 3?", "label": True},
    {"uid": "q-8", "query": "Is 2 larger than 9?", "label": "No"},
    {"uid": "q-9", "query": "Is water wet?", "label": "true"},
]
CHOICE_ROWS = [  # parquet; options as a list; answers as a letter, a label-less text, "(b)"
    {"stem": "Which is a mammal?", "opts": ["trout", "whale", "eagle"], "key": "B"},
    {"stem": "Which is a colour?", "opts": ["red", "seven", "table"], "key": "red"},
    {"stem": "Which number is even?", "opts": ["3", "4", "5", "7"], "key": "(b)"},
]
TEXT_ROWS = [  # csv; a short text answer
    {"q": "Which ocean lies between Africa and Australia?", "a": "Indian Ocean"},
    {"q": "What is the capital of France?", "a": "Paris"},
]


def _csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _spec(path: Path | str, kind: str, split: str = "test", **kw) -> DatasetSpec:
    fields = {
        "number": dict(question="Frage", answer="Ergebnis", solution="Weg", steps="Schritte"),
        "yesno": dict(question="query", answer="label", id="uid"),
        "choice": dict(question="stem", answer="key", choices="opts"),
        "text": dict(question="q", answer="a"),
    }[kind]
    skip = kw.pop("skip_bad_records", False)
    custom = CustomFields(answer_kind=kind, **{**fields, **kw})
    return DatasetSpec("custom", split=split, path=str(path), custom=custom, skip_bad_records=skip)


def _load(spec: DatasetSpec) -> list[Problem]:
    return list(load_problems(spec))


# --- loading each kind ---------------------------------------------------------------------------


def test_number_csv_with_its_own_columns_solution_and_steps(tmp_path: Path) -> None:
    problems = _load(_spec(_csv(tmp_path / "mine.csv", NUMBER_ROWS), "number"))
    assert [p.id for p in problems] == ["custom/test/0", "custom/test/1"]
    assert [p.answer for p in problems] == ["12", "1500"]
    assert {p.answer_kind for p in problems} == {"number"} and problems[0].dataset == "custom"
    assert problems[1].solution == "1200+300 = 1500"
    assert [s.question for s in problems[1].steps] == ["How many pens before?",
                                                       "How many pens in all?"]  # fmt: skip
    assert problems[0].steps[0].answer == "She has 3*4 = <<3*4=12>>12 apples."


def test_yesno_jsonl_with_an_id_field(tmp_path: Path) -> None:
    problems = _load(_spec(_jsonl(tmp_path / "yn.jsonl", YESNO_ROWS), "yesno", split="dev"))
    assert [p.id for p in problems] == ["custom/dev/q-7", "custom/dev/q-8", "custom/dev/q-9"]
    assert [p.answer for p in problems] == ["yes", "no", "yes"]
    assert all(p.answer_kind == "yesno" and p.solution is None for p in problems)


def test_choice_parquet_puts_the_options_in_the_question_and_answers_a_letter(
    tmp_path: Path,
) -> None:
    problems = _load(_spec(_parquet(tmp_path / "mc.parquet", CHOICE_ROWS), "choice"))
    assert problems[0].question == "Which is a mammal? Options: (A) trout (B) whale (C) eagle"
    assert [p.answer for p in problems] == ["B", "A", "B"]  # a letter, an option's text, "(b)"
    assert all(p.answer_kind == "choice" for p in problems)


def test_choice_json_with_label_text_choices_and_options_already_in_the_text(
    tmp_path: Path,
) -> None:
    """The hub's usual shape (ARC: `{label: [1..4], text: [...]}`, answerKey a label) as a JSON
    file, and a question that carries its options itself (no choices field)."""
    arc = tmp_path / "arc.json"
    arc.write_text(json.dumps([
        {"question": "Which gas do plants take in?", "answerKey": "2",
         "choices": {"label": ["1", "2", "3"], "text": ["oxygen", "carbon dioxide", "helium"]}},
    ]))  # fmt: skip
    (p,) = _load(_spec(arc, "choice", question="question", answer="answerKey", choices="choices"))
    assert p.question.endswith("Options: (A) oxygen (B) carbon dioxide (C) helium")
    assert p.answer == "B"
    inline = _jsonl(tmp_path / "inline.jsonl", [{"q": "Pick one: (A) x (B) y", "a": "b"}])
    (p,) = _load(_spec(inline, "choice", question="q", answer="a", choices=None))
    assert (p.question, p.answer) == ("Pick one: (A) x (B) y", "B")


def test_text_csv(tmp_path: Path) -> None:
    problems = _load(_spec(_csv(tmp_path / "t.csv", TEXT_ROWS), "text"))
    assert [(p.id, p.answer, p.answer_kind) for p in problems] == [
        ("custom/test/0", "Indian Ocean", "text"),
        ("custom/test/1", "Paris", "text"),
    ]


def test_a_hub_dataset_goes_through_datasets_load_dataset(tmp_path: Path) -> None:
    """Any `--path` that is not a file is a hub id; a local directory laid out like a hub repo
    takes the same `datasets.load_dataset(path, hub_config, split=...)` call offline."""
    repo = tmp_path / "my-qa"
    (repo / "qa").mkdir(parents=True)
    _jsonl(repo / "qa" / "test.jsonl", TEXT_ROWS)
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: qa\n  data_files:\n"
        "  - split: test\n    path: qa/test.jsonl\n---\n"
    )
    cfg = EvaluateConfig(dataset="custom", path=str(repo), hub_config="qa", question_field="q",
                         answer_field="a", answer_kind="text")  # fmt: skip
    spec = DatasetSpec.from_config(cfg.with_absolute_paths())
    assert spec.path == str(repo) and spec.config == "qa"
    assert [p.answer for p in _load(spec)] == ["Indian Ocean", "Paris"]
    hub_id = "someone/some-qa"  # never made absolute: it is no file
    cfg = EvaluateConfig(dataset="custom", path=hub_id, question_field="q", answer_field="a",
                         answer_kind="text")  # fmt: skip
    assert cfg.with_absolute_paths().path == hub_id


# --- ids ------------------------------------------------------------------------------------------


def test_ids_are_stable_across_loads_and_skips_never_renumber(tmp_path: Path) -> None:
    path = _csv(tmp_path / "t.csv", [TEXT_ROWS[0], {"q": "", "a": "x"}, TEXT_ROWS[1]])
    with pytest.raises(DatasetRecordError):
        _load(_spec(path, "text"))
    first = _load(_spec(path, "text", skip_bad_records=True))
    again = _load(_spec(path, "text", skip_bad_records=True))
    assert first == again
    assert [p.id for p in first] == ["custom/test/0", "custom/test/2"]  # positions, not counts
    yn = _jsonl(tmp_path / "yn.jsonl", YESNO_ROWS)
    assert [p.id for p in _load(_spec(yn, "yesno"))] == [p.id for p in _load(_spec(yn, "yesno"))]


def test_a_repeated_id_is_a_bad_record(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "yn.jsonl", [*YESNO_ROWS, {**YESNO_ROWS[0], "query": "Again?"}])
    with pytest.raises(DatasetRecordError, match="duplicate id 'custom/test/q-7'") as err:
        _load(_spec(path, "yesno"))
    assert (err.value.where, err.value.field_name) == ("line 4", "uid")


def test_split_in_the_path_names_one_file_per_split(tmp_path: Path) -> None:
    _csv(tmp_path / "qa_train.csv", TEXT_ROWS[:1])
    _csv(tmp_path / "qa_test.csv", TEXT_ROWS[1:])
    pattern = tmp_path / "qa_{split}.csv"
    assert [p.answer for p in _load(_spec(pattern, "text", split="train"))] == ["Indian Ocean"]
    assert [p.id for p in _load(_spec(pattern, "text", split="test"))] == ["custom/test/0"]


# --- bad records ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "record", "field", "why"),
    [
        ("number", {"Frage": "q?", "Weg": "w", "Schritte": "a ** b"}, "Ergebnis", "missing"),
        ("number", {"Frage": "q?", "Ergebnis": "many", "Weg": "w", "Schritte": "a ** b"},
         "Ergebnis", "expected a number"),
        ("number", {"Frage": "q?", "Ergebnis": "3", "Weg": "w", "Schritte": "no separator"},
         "Schritte", "step 1 is not 'sub-question \\*\\* answer'"),
        ("yesno", {"uid": "x", "query": "q?", "label": "maybe"}, "label", "yes/no"),
        ("yesno", {"uid": "", "query": "q?", "label": "yes"}, "uid", "empty"),
        ("choice", {"stem": "q?", "opts": ["a", "b"], "key": "D"}, "key", "D but the record has 2"),
        ("choice", {"stem": "q?", "opts": ["a", "b"], "key": "neither"}, "key", "choice letter"),
        ("choice", {"stem": "q?", "opts": ["a"], "key": "A"}, "opts", "2 to 10 options"),
        ("text", {"q": "q?", "a": "  "}, "a", "empty"),
        ("text", {"q": "q?"}, "a", "missing"),
    ],
)  # fmt: skip
def test_a_bad_record_names_the_file_the_row_and_the_field(
    tmp_path: Path, kind: str, record: dict, field: str, why: str
) -> None:
    good = {"number": NUMBER_ROWS, "yesno": YESNO_ROWS, "choice": CHOICE_ROWS, "text": TEXT_ROWS}
    path = _jsonl(tmp_path / f"{kind}.jsonl", [good[kind][0], record])
    with pytest.raises(DatasetRecordError, match=why) as err:
        _load(_spec(path, kind))
    assert (err.value.source, err.value.where, err.value.field_name) == (str(path), "line 2", field)
    assert str(err.value).startswith(f"{path}: line 2: field {field!r}: ")


def test_a_bad_row_of_a_csv_and_of_a_parquet_file_is_named_too(tmp_path: Path) -> None:
    path = _csv(tmp_path / "t.csv", [*TEXT_ROWS, {"q": "", "a": "x"}])
    with pytest.raises(DatasetRecordError, match=r"t\.csv: line 4: field 'q': empty"):
        _load(_spec(path, "text"))
    path = _parquet(tmp_path / "mc.parquet", [*CHOICE_ROWS, {**CHOICE_ROWS[0], "key": "Z"}])
    with pytest.raises(DatasetRecordError, match=r"mc\.parquet: row 4: field 'key'"):
        _load(_spec(path, "choice"))


def test_skip_bad_records_skips_and_counts_every_one(tmp_path: Path) -> None:
    lines = [json.dumps(TEXT_ROWS[0]), "{not json", json.dumps({"q": "q?", "a": ""}),
             json.dumps({"a": "x"}), json.dumps(TEXT_ROWS[1])]  # fmt: skip
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    spec = _spec(path, "text", skip_bad_records=True)
    problems = _load(spec)
    assert [p.answer for p in problems] == ["Indian Ocean", "Paris"]
    assert [p.id for p in problems] == ["custom/test/0", "custom/test/4"]  # the file's positions
    assert spec.stats.skipped_records == 3 and spec.stats.records == 2
    first, *rest = spec.stats.skipped_examples
    assert first.startswith(f"{path}: line 2: field '<json>': not JSON: ")
    assert rest == [f"{path}: line 3: field 'a': empty", f"{path}: line 4: field 'q': missing"]
    # An equal spec (what a stage's summary builds from its config) finds this load's count.
    assert load_stats(_spec(path, "text", skip_bad_records=True)) is spec.stats
    _load(spec)  # a reload counts afresh
    assert spec.stats.skipped_records == 3


# --- options: flags and YAML, on every stage -----------------------------------------------------

FLAGS = ["--dataset", "custom", "--path", "mine_{split}.csv", "--question-field", "Frage",
         "--answer-field", "Ergebnis", "--answer-kind", "number", "--id-field", "Nr",
         "--solution-field", "Weg", "--steps-field", "Schritte", "--skip-bad-records"]  # fmt: skip
YAML = """dataset: custom
path: mine_{split}.csv
question_field: Frage
answer_field: Ergebnis
answer_kind: number
id_field: Nr
solution_field: Weg
steps_field: Schritte
skip_bad_records: yes
"""
WANT = CustomFields(question="Frage", answer="Ergebnis", answer_kind="number", id="Nr",
                    solution="Weg", steps="Schritte")  # fmt: skip


@pytest.mark.parametrize(
    ("cls", "extra"), [(AnnotateConfig, ["--output", "o"]), (EvaluateConfig, [])]
)
def test_the_options_as_flags_and_as_yaml_keys(tmp_path: Path, cls: type, extra: list) -> None:
    by_flags = parse_config(cls, [*FLAGS, *extra])
    config = tmp_path / "run.yaml"
    config.write_text(YAML)
    by_yaml = parse_config(cls, ["--config", str(config), *extra])
    for cfg in (by_flags, by_yaml):
        spec = DatasetSpec.from_config(cfg)
        assert (spec.name, spec.path, spec.custom, spec.skip_bad_records) == (
            "custom", "mine_{split}.csv", WANT, True,
        )  # fmt: skip
    flag = parse_config(cls, ["--config", str(config), "--answer-kind", "text", *extra])
    assert DatasetSpec.from_config(flag).custom.answer_kind == "text"  # a flag beats the YAML


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dataset", "custom", "--path", "x.csv", "--question-field", "q"],
         "a custom dataset also needs --answer-field, --answer-kind"),
        (["--dataset", "custom", "--question-field", "q", "--answer-field", "a",
          "--answer-kind", "text"], "--dataset custom needs --path"),
        (["--dataset", "gsm8k", "--question-field", "q", "--answer-field", "a",
          "--answer-kind", "text"], "are for --dataset custom, not gsm8k"),
        (["--dataset", "custom", "--path", "x.csv", "--question-field", "q", "--answer-field",
          "a", "--answer-kind", "text", "--choices-field", "c"], "--choices-field needs"),
        (["--dataset", "custom", "--answer-kind", "letter"], "invalid choice: 'letter'"),
    ],
)  # fmt: skip
def test_incomplete_or_misplaced_options_are_refused_at_parse(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    for cls, extra in ((AnnotateConfig, ["--output", "o"]), (EvaluateConfig, [])):
        with pytest.raises(SystemExit):
            parse_config(cls, [*argv, *extra])
        assert message in capsys.readouterr().err


def test_a_yaml_answer_kind_is_checked_against_the_kinds(tmp_path: Path, capsys) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(YAML.replace("answer_kind: number", "answer_kind: letter"))
    with pytest.raises(SystemExit):
        parse_config(EvaluateConfig, ["--config", str(config)])
    assert f"{config}: answer_kind: 'letter' is not one of number, yesno" in capsys.readouterr().err


def test_the_quality_study_reads_a_custom_dataset(tmp_path: Path) -> None:
    from pipelines.quality import QualityConfig, problems_of, spec_kwargs

    for split in ("train", "test"):
        _csv(tmp_path / f"mine_{split}.csv", NUMBER_ROWS)
    flags = ["--dataset", "custom", "--path", str(tmp_path / "mine_{split}.csv"),
             "--question-field", "Frage", "--answer-field", "Ergebnis", "--answer-kind",
             "number", "--steps-field", "Schritte"]  # fmt: skip
    cfg = parse_config(QualityConfig, flags)
    assert [p.answer for p in problems_of(cfg, "test", None)] == ["12", "1500"]
    assert len(problems_of(cfg, "train", 1)) == 1
    ann = AnnotateConfig(**spec_kwargs(cfg, "train"), mode="gold", output="o")  # stage 1's
    assert DatasetSpec.from_config(ann).custom.steps == "Schritte"
    with pytest.raises(SystemExit):  # the study trains on the dataset's own steps
        parse_config(QualityConfig, flags[:-2])
    with pytest.raises(SystemExit):  # one local file cannot be both train and test
        parse_config(QualityConfig, [*flags[:3], str(tmp_path / "mine_train.csv"), *flags[4:]])


# --- the teacher prompt and the judge, per kind -------------------------------------------------


def _problem(kind: str, answer: str, question: str = "Q?") -> Problem:
    return Problem(f"custom/test/{kind}", "custom", "test", question, answer, answer_kind=kind)


def test_the_teacher_prompt_asks_for_each_kind(tmp_path: Path) -> None:
    (mc,) = _load(_spec(_parquet(tmp_path / "mc.parquet", CHOICE_ROWS[:1]), "choice"))
    cfg = AnnotateConfig(
        dataset="custom", path="x.parquet", output="o", answer_kind="choice",
        question_field="stem", answer_field="key", choices_field="opts",
    )  # fmt: skip
    prompt = cfg.prompt_for("number")  # the dataset's stated kind wins over a lost one
    assert prompt.version == "socratic-choice-v1"
    messages = prompt.messages(mc, with_solution=True)
    assert "So the answer is (X)." in messages[0]["content"]
    assert messages[-1]["content"] == (
        "Problem: Which is a mammal? Options: (A) trout (B) whale (C) eagle"
    )  # the options reach the teacher as the students will see them
    text = Prompt.default("socratic", "text")
    assert text.version == "socratic-text-v1" and "So the answer is <short answer>." in text.system
    assert Prompt.default("cot", "choice").version == "cot-choice-v1"
    assert '"Answer: <short answer>" giving only the answer' in Prompt.default("cot", "text").system
    with pytest.raises(ValueError, match="no bundled prompt for answer kind 'date'"):
        Prompt.default("socratic", "date")


@pytest.mark.parametrize(
    ("kind", "gold", "reply", "status"),
    [
        ("text", "Indian Ocean", "Q1: Which?\nA1: So the answer is the indian ocean!", "accepted"),
        ("text", "Paris", "Q1: Which city?\nA1: So the answer is Lyon.", "rejected"),
        ("choice", "B", "Q1: Which one?\nA1: A whale is a mammal. So the answer is (b).",
         "accepted"),
        ("choice", "B", "Q1: Which one?\nA1: So the answer is (C).", "rejected"),
        ("yesno", "no", "Q1: Is it?\nA1: It is not. So the answer is no.", "accepted"),
        ("number", "1500", "Q1: How many?\nA1: 1200+300 = <<1200+300=1500>>1500 pens. So the "
         "answer is 1500.", "accepted"),
    ],
)  # fmt: skip
def test_the_judge_compares_each_kind_as_evaluation_does(
    kind: str, gold: str, reply: str, status: str
) -> None:
    v = judge(_problem(kind, gold), reply, "socratic")
    assert v.status == status, v
    assert v.reason == (None if status == "accepted" else "wrong_answer")
    cot = judge(_problem(kind, gold), reply.split("A1: ")[1].replace("So the answer is", "Answer:")
                .replace(". Answer:", ".\nAnswer:"), "cot")  # fmt: skip
    assert cot.status == status, cot


def test_a_row_that_lost_its_kind_is_judged_by_the_configs(tmp_path: Path) -> None:
    """The Batch API keeps only some item fields: a custom config's stated kind still rules, and
    the row's kind survives the annotation Parquet otherwise."""
    p = _problem("text", "Indian Ocean")
    row = annotation_row(p, sample=0, teacher="t", prompt_version="v", style="socratic",
                         cache_key="k", steps=(), predicted=None, status="rejected",
                         reason="unparseable")  # fmt: skip
    assert row["answer_kind"] == "text" and problem_from_row(row) == p
    lost = problem_from_row({**row, "answer_kind": None})
    assert lost.answer_kind == "number"  # what an old row reads as
    cfg = AnnotateConfig(dataset="custom", path="x.csv", output="o", question_field="q",
                         answer_field="a", answer_kind="text")  # fmt: skip
    out = verdict_fields(cfg, lost, "Q1: Which ocean?\nA1: So the answer is the Indian Ocean.",
                         "socratic")  # fmt: skip
    assert (out["status"], out["predicted"]) == ("accepted", "the Indian Ocean")


# --- end to end: annotation against the test teacher, judged as text ----------------------------


def test_annotating_a_custom_text_csv_against_the_test_teacher(ray_cluster, tmp_path) -> None:
    from pipelines.annotate import run
    from pipelines.summary import format_summary
    from serve.fake_teacher import FaultPlan, TeacherServer
    from tests.support.annotations import read_annotation_rows

    rows = [
        {"question": "Which ocean lies between Africa and Australia?", "answer": "Indian Ocean",
         "steps": json.dumps([["Which ocean lies east of Africa?", "The Indian Ocean."],
                              ["And between Africa and Australia?",
                               "So the answer is the indian ocean!"]])},
        {"question": "What is the capital of France?", "answer": "Paris",
         "steps": "What is the capital of France? ** So the answer is PARIS."},
        {"question": "Which planet is red?", "answer": "Mars",
         "steps": "Which planet is red? ** So the answer is Mars."},
        {"question": "A record with no answer", "answer": "", "steps": "a ** b"},
    ]  # fmt: skip
    path = _csv(tmp_path / "geo.csv", rows)
    opts = dict(dataset="custom", split="test", path=str(path), question_field="question",
                answer_field="answer", steps_field="steps", answer_kind="text",
                skip_bad_records=True)  # fmt: skip
    problems = list(load_problems(DatasetSpec.from_config(EvaluateConfig(**opts))))
    assert len(problems) == 3
    with TeacherServer(problems) as server:
        server.set_plan(FaultPlan(per_problem={"custom/test/2": ["wrong"]}))
        cfg = AnnotateConfig(**opts, output=str(tmp_path / "out"), base_url=server.base_url,
                             model="test-teacher", retry_base=0.01, timeout=5.0)  # fmt: skip
        summary = run(cfg)
        assert server.stats()["unknown_problems"] == 0
    got = {r["id"]: r for r in read_annotation_rows(cfg.output)}
    assert set(got) == {"custom/test/0", "custom/test/1", "custom/test/2"}
    assert all(r["answer_kind"] == "text" and r["prompt_version"] == "socratic-text-v1"
               for r in got.values())  # fmt: skip
    # Accepted as text: case, punctuation and the article do not count (as a number, or read
    # without normalisation, these would be rejected).
    assert (got["custom/test/0"]["status"], got["custom/test/0"]["predicted"]) == (
        "accepted", "the indian ocean!",
    )  # fmt: skip
    assert got["custom/test/1"]["status"] == "accepted"
    assert (got["custom/test/2"]["status"], got["custom/test/2"]["reason"]) == (
        "rejected", "wrong_answer",
    )  # fmt: skip
    assert (summary["accepted"], summary["rejected"], summary["skipped_records"]) == (2, 1, 1)
    assert summary["skipped_record_errors"] == [f"{path}: line 5: field 'answer': empty"]
    assert "skipped 1 bad dataset records (--skip-bad-records)" in format_summary(summary)

    # --mode gold on the same file: the dataset's own steps, judged by the same text rules.
    gold = run(AnnotateConfig(**opts, mode="gold", output=str(tmp_path / "gold")))
    assert (gold["accepted"], gold["rejected"], gold["skipped_records"]) == (3, 0, 1)
