"""Decontamination (issue #23 item 5): training problems sharing a 13-gram with the evaluation
problems are dropped on the driver, counted and reported, in seconds and without Ray Train.

Real files throughout: annotation Parquet written from the bundled sample, evaluation files the
tests write, the bundled sample's test split as `auto`'s evaluation set, and GSM8K from
../shared/data where present.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from socratic.adapters import DatasetSpec, load_problems
from socratic.config import parse_config
from socratic.decontaminate import NgramIndex, decontaminate, main, normalize, words
from tests.support.annotations import write_gold_annotations
from tests.support.paths import require_shared
from trainers.config import TrainConfig

TRAIN = list(load_problems(DatasetSpec("sample", split="train")))
TEST = list(load_problems(DatasetSpec("sample", split="test")))

NATALIA = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether in April and May?"
)


def _index(*texts: str, **kw) -> NgramIndex:
    return NgramIndex([(f"e{i}", t) for i, t in enumerate(texts)], **kw)


# --- the n-gram check -------------------------------------------------------------------------


def test_normalisation_is_nfkc_lowercase_without_punctuation_and_single_spaced() -> None:
    assert normalize("Ｎａｔａｌｉａ  SOLD\u00a048 clips,\tfor $1,250.50!\n") == (
        "natalia sold 48 clips for 125050"
    )
    assert normalize("Tom’s ﬁve “apples” — (3×4) _x_") == "toms five apples 34 x"
    assert words("It's 5-year-old Ann's.") == ["its", "5yearold", "anns"]


def test_a_paraphrase_sharing_13_words_is_caught_and_names_the_eval_problem() -> None:
    index = _index("Ben has 3 dogs and feeds each of them twice a day for a week.", NATALIA)
    paraphrase = (
        "MARIA sold clips to 48 of her friends in April; and then she sold HALF as many clips "
        "in May... What is the total number of clips?"
    )
    m = index.match(paraphrase)
    assert m is not None and m.eval_id == "e1"
    assert len(m.ngram.split()) == 13 and m.ngram in normalize(NATALIA)
    assert index.match("Maria sold 48 clips in April and some more in May; how many?") is None


def test_sharing_12_words_is_not_caught_13_is() -> None:
    shared = "the farmer planted rows of corn and beans in the north field"  # 12 words
    index = _index(f"In spring {shared} before the rain came down hard on the hills.")
    assert index.match(f"Last year {shared} after harvesting wheat on all of his land.") is None
    # One word more in common (`before`) is a 13-gram.
    m = index.match(f"Last year {shared} before harvesting wheat on all of his land.")
    assert m is not None and m.ngram == f"{shared} before"
    # n is configurable: at 12 the first text is caught.
    twelve = _index(f"In spring {shared} before the rain came down hard on the hills.", n=12)
    assert twelve.match(f"Last year {shared} after harvesting wheat on all of his land.")


def test_short_texts_match_whole_from_8_words_and_never_below() -> None:
    nine = "How many apples does Tom have in total now?"  # 9 words: used whole
    index = _index(nine, "How many apples are left?", NATALIA)
    long = "Tom picks 12 apples and buys 30 more. How many apples does Tom have in total now?"
    assert index.match(long).eval_id == "e0"  # a short eval text inside a long training text
    assert index.match("how many apples does TOM have in total now").eval_id == "e0"
    assert index.match("How many apples does Tom have now in total?") is None  # other order
    assert index.match("How many apples does Tom have in total?").eval_id == "e0"  # 8 inside 9
    # A short training text inside a long eval text.
    assert index.match("She sold half as many clips in May.").eval_id == "e2"  # 8 words
    # Under 8 words never matches, either side: such questions occur in unrelated problems.
    assert index.match("How many apples are left?") is None
    assert index.match("Jo has 40 pears and eats 3. How many apples are left?") is None
    assert index.match("half as many clips in May") is None


def test_decontaminate_counts_problems_not_teacher_samples() -> None:
    index = _index(NATALIA)
    rows = [("t1", NATALIA), ("t1", NATALIA), ("t2", "Ben has 3 dogs and 2 cats at home.")]
    report = decontaminate(rows, index)
    assert (report.checked, report.dropped, list(report.matches)) == (2, 1, ["t1"])
    assert report.summary()["matches"]["t1"]["eval_id"] == "e0"
    assert "dropped 1 of 2 training problems sharing a 13-gram" in report.line()


def test_gsm8k_train_against_test(tmp_path: Path) -> None:
    """The real count, with the CLI that reports it (see benchmarks/decontamination.py)."""
    train = require_shared("gsm8k/train.jsonl")
    test = require_shared("gsm8k/test.jsonl")
    out = tmp_path / "report.json"
    argv = ["--dataset", "gsm8k", "--train", str(train), "--eval", str(test), "--json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert (report["checked"], report["eval_problems"]) == (7473, 1319)
    assert report["dropped"] == 4
    assert report["matches"]["gsm8k/train/20"]["eval_id"] == "gsm8k/test/632"  # stamps, Bella/Max


# --- training: the setting, the driver's filter -------------------------------------------------


def _rows(problems, tmp: Path) -> tuple[Path, list[dict]]:
    from trainers.data import read_accepted

    data = write_gold_annotations(problems, tmp)
    return data, read_accepted(str(data))


def _cfg(data: Path, model: str = "m", **kw) -> TrainConfig:
    return TrainConfig(data=str(data), base_model=model, num_workers=1, **kw)


# A training problem that is sample/test/0 reworded around a 16-word run of it.
LEAKED = replace(
    TEST[0],
    id="sample/train/leaked",
    split="train",
    question="Lena's car can go 30 miles on one gallon of gas, and gas costs $3.40 per gallon. "
    "What does the gas cost for a 120-mile trip?",
)


def test_the_driver_drops_overlapping_problems_and_every_worker_trains_without_them(
    tmp_path: Path, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from trainers.loop import RoleJob, load_data, load_tokenizer, split_rows
    from trainers.train import (
        check_data,
        decontamination,
        decontamination_summary,
        format_summary,
        prepare,
    )

    data, rows = _rows([*TRAIN, LEAKED], tmp_path / "ann")
    cfg = _cfg(data, str(tiny_model_dir), roles="decomposer")
    assert cfg.decontaminate == "auto"  # the default: sample's evaluation set is sample/test
    with caplog.at_level(logging.INFO, logger="train"):
        report = decontamination(cfg, rows)
    assert list(report.matches) == ["sample/train/leaked"]
    assert report.matches["sample/train/leaked"].eval_id == "sample/test/0"
    assert (report.checked, report.dropped, report.eval_set) == (33, 1, "sample/test")
    assert "decontamination: dropped 1 of 33 training problems sharing a 13-gram with " \
        "sample/test" in caplog.text  # fmt: skip

    drop = frozenset(report.matches)
    train, _ = split_rows(cfg, drop, rows)
    assert {r["id"] for r in train} == {p.id for p in TRAIN}
    assert check_data(cfg, drop, rows) == {"decomposer": 32}
    assert check_data(cfg) == {"decomposer": 33}  # nothing dropped without the driver's ids
    # What `run` hands Ray Train (everything before Ray starts), and what a worker builds.
    jobs, summary = prepare(cfg)
    assert [(j.role, j.drop) for j in jobs] == [("decomposer", drop)]
    tokenizer = load_tokenizer(cfg.base_model)
    assert load_data(jobs[0], tokenizer).train_problems == 32
    assert load_data(RoleJob(cfg, "decomposer"), tokenizer).train_problems == 33

    assert summary == decontamination_summary(cfg, report)
    assert summary["setting"] == "auto" and summary["dropped"] == 1
    assert summary["matches"]["sample/train/leaked"]["eval_id"] == "sample/test/0"
    json.dumps(summary)  # goes into provenance.json
    result = {"role": "decomposer", "steps": 1, "tokens": 1, "train_s": 1.0, "wall_s": 1.0,
              "final_loss": 1.0, "resumed_from_step": 0, "export": "x",
              "exports": {"decomposer": "x"}, "decontamination": summary}  # fmt: skip
    assert format_summary([result]).splitlines()[0] == (
        "decontamination (auto): dropped 1 of 33 training problems sharing a 13-gram with "
        "sample/test"
    )


def test_auto_drops_evaluation_problems_trained_on_and_refuses_data_that_is_all_eval(
    tmp_path: Path,
) -> None:
    from trainers.train import decontamination

    data, rows = _rows([*TRAIN, *TEST], tmp_path / "all")
    report = decontamination(_cfg(data), rows)
    assert sorted(report.matches) == sorted(p.id for p in TEST)
    assert all(report.matches[p.id].eval_id == p.id for p in TEST)
    data, rows = _rows(TEST, tmp_path / "test")
    with pytest.raises(ValueError, match="every training problem is an evaluation problem"):
        decontamination(_cfg(data), rows)
    assert decontamination(_cfg(data, decontaminate="off"), rows).dropped == 0


def test_auto_warns_and_checks_nothing_when_the_eval_set_cannot_be_loaded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from trainers.train import decontamination

    gsm8k = [replace(p, id=f"gsm8k/train/{i}", dataset="gsm8k") for i, p in enumerate(TRAIN)]
    data, rows = _rows([*gsm8k, replace(LEAKED, dataset="arith")], tmp_path / "ann")
    asked = []

    def offline(spec: DatasetSpec):
        asked.append((spec.name, spec.split, spec.path))
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub")

    with caplog.at_level(logging.WARNING, logger="train"):
        report = decontamination(_cfg(data), rows, load=offline)
    assert asked == [("gsm8k", "test", None)]
    assert (report.dropped, report.checked) == (0, 33)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("decontamination skipped for gsm8k/test: could not be loaded (ConnectionError"
               in w for w in warned), warned  # fmt: skip
    assert any("arith" in w for w in warned), warned
    assert len(report.skipped) == 2

    # A local copy through the same loader: checked, with the adapter's ids.
    test = [replace(LEAKED, id="gsm8k/test/0", dataset="gsm8k", split="test")]

    def local(spec: DatasetSpec):
        return test if spec.name == "gsm8k" else []

    leaked = replace(LEAKED, id="gsm8k/train/leaked", dataset="gsm8k")
    data, rows = _rows([*gsm8k, leaked], tmp_path / "ann2")
    report = decontamination(_cfg(data), rows, load=local)
    assert {k: m.eval_id for k, m in report.matches.items()} == {
        "gsm8k/train/leaked": "gsm8k/test/0"
    }


def test_off_checks_nothing_and_loads_nothing(tmp_path: Path) -> None:
    from trainers.train import decontamination

    data, rows = _rows([*TRAIN, *TEST], tmp_path / "ann")

    def never(spec: DatasetSpec):
        raise AssertionError("off must not load an evaluation set")

    report = decontamination(_cfg(data, decontaminate="OFF"), rows, load=never)
    assert (report.dropped, report.checked, report.skipped) == (0, 40, ["--decontaminate off"])


def test_a_file_of_problems_is_the_evaluation_set(tmp_path: Path) -> None:
    from trainers.train import check_config, decontamination

    data, rows = _rows([*TRAIN, LEAKED], tmp_path / "ann")
    jsonl = tmp_path / "eval.jsonl"
    jsonl.write_text(
        json.dumps({"id": "mine/0", "question": TEST[0].question}) + "\n"
        + json.dumps({"question": NATALIA}) + "\n"
    )  # fmt: skip
    cfg = _cfg(data, decontaminate=str(jsonl))
    check_config(cfg)
    report = decontamination(cfg, rows, load=None)  # a FILE never asks the loader
    assert {k: m.eval_id for k, m in report.matches.items()} == {"sample/train/leaked": "mine/0"}
    assert (report.eval_set, report.eval_problems) == (str(jsonl), 2)
    # SVAMP's Body + Question, in a CSV; ids from where the record is.
    csv = tmp_path / "svamp.csv"
    body, question = TEST[0].question.split(". How", 1)
    csv.write_text(f'Body,Question\n"{body}.","How{question}"\n')
    report = decontamination(_cfg(data, decontaminate=str(csv)), rows)
    assert {k: m.eval_id for k, m in report.matches.items()} == {
        "sample/train/leaked": "svamp.csv:line 2"
    }


def test_a_bad_file_fails_before_training_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from trainers.train import check_config, decontamination, main

    data, rows = _rows(TRAIN, tmp_path / "ann")
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=r"--decontaminate: no such file .*nope\.jsonl"):
        check_config(_cfg(data, decontaminate=str(missing)))
    odd = tmp_path / "eval.txt"
    odd.write_text("x")
    with pytest.raises(ValueError, match=r"eval\.txt is not one of \.jsonl"):
        check_config(_cfg(data, decontaminate=str(odd)))
    no_question = tmp_path / "answers.jsonl"
    no_question.write_text(json.dumps({"id": "a", "answer": "4"}) + "\n")
    with pytest.raises(ValueError, match=r"answers\.jsonl: line 1 has no question field"):
        decontamination(_cfg(data, decontaminate=str(no_question)), rows)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no problems"):
        decontamination(_cfg(data, decontaminate=str(empty)), rows)
    with pytest.raises(ValueError, match="--decontaminate must be"):
        _cfg(data, decontaminate=" ")

    # The CLI: exit 2 with the file named, before Ray or any output exists.
    out = tmp_path / "students"
    argv = ["--data", str(data), "--base-model", "m", "--output", str(out),
            "--storage-path", str(tmp_path / "ray"), "--decontaminate", str(missing)]  # fmt: skip
    assert main(argv) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "ray").exists()
    argv[-1] = str(no_question)
    assert main(argv) == 2
    assert "answers.jsonl: line 1 has no question field" in capsys.readouterr().err


def test_the_option_from_flags_and_yaml(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["--data", "d", "--base-model", "m"]
    assert parse_config(TrainConfig, base).decontaminate == "auto"
    assert parse_config(TrainConfig, [*base, "--decontaminate", "Off"]).decontaminate == "off"
    path = tmp_path / "c.yaml"
    path.write_text("decontaminate: 'off'\n")
    assert parse_config(TrainConfig, [*base, "--config", str(path)]).decontaminate == "off"
    path.write_text("decontaminate: off\n")  # YAML 1.1 reads a bare off as false
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, [*base, "--config", str(path)])
    assert "decontaminate: expected str, got False (quote it in YAML)" in capsys.readouterr().err
