"""The generated `arith` family: seeded, disjoint splits, gold steps the calculator agrees with,
and every stage's reader (annotate --mode gold, the test teacher) takes it as it takes GSM8K."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.annotate import AnnotateConfig, output_fs, parquet_files, run
from serve.fake_teacher import FaultPlan, TeacherServer
from socratic.adapters import DatasetSpec, load_problems
from socratic.answers import answers_match, extract_answer
from socratic.arith import ArithConfig
from socratic.calculator import apply_calculator, evaluate, format_number
from socratic.formats import examples_for
from socratic.records import problem_from_row

CONFIG = "ops=1-8,long_ops=6-8,n_train=400,n_test=100,n_long=50"


def _load(split: str, seed: int = 0, config: str = CONFIG, **kw):
    return list(load_problems(DatasetSpec("arith", split=split, seed=seed, config=config, **kw)))


def test_same_seed_same_problems_and_another_seed_others() -> None:
    assert _load("train", seed=3) == _load("train", seed=3)
    assert _load("test", seed=3) == _load("test", seed=3)
    other = {p.question for p in _load("train", seed=4)}
    assert len(other & {p.question for p in _load("train", seed=3)}) < 10


def test_splits_are_disjoint_and_sized_and_long_is_longer() -> None:
    train, test, long = _load("train"), _load("test"), _load("long")
    assert (len(train), len(test), len(long)) == (400, 100, 50)
    texts = [{p.question for p in s} for s in (train, test, long)]
    assert [len(t) for t in texts] == [400, 100, 50]  # no repeats inside a split either
    assert not texts[0] & texts[1] and not texts[0] & texts[2] and not texts[1] & texts[2]
    assert {len(p.steps) for p in train} == set(range(1, 9))
    assert {len(p.steps) for p in test} <= set(range(1, 9))
    assert {len(p.steps) for p in long} <= {6, 7, 8}
    assert [p.id for p in test[:2]] == ["arith/test/0", "arith/test/1"]


def test_every_gold_span_is_right_and_the_answer_is_the_last_step() -> None:
    for p in _load("train") + _load("long"):
        assert p.dataset == "arith" and p.answer and p.solution
        assert p.solution.splitlines() == [s.answer for s in p.steps]
        assert p.question.endswith(p.steps[-1].question)
        for s in p.steps:
            assert s.answer.count("<<") == 1
            expr, _, claimed = s.answer.split("<<")[1].split(">>")[0].partition("=")
            value = evaluate(expr)
            assert format_number(value) == claimed and value.denominator == 1 and value > 0
            assert apply_calculator(s.answer).text == s.answer  # the calculator changes nothing
        assert extract_answer(p.steps[-1].answer) == p.answer
        assert answers_match(extract_answer(p.solution), p.answer)
        for role in ("decomposer", "solver", "unified", "cot", "answer"):
            assert examples_for(
                role, problem=p.question, steps=p.steps, solution=p.solution, answer=p.answer
            )


def test_knobs_change_lengths_and_operands_and_bad_knobs_say_why() -> None:
    problems = _load("train", config="ops=2-2,operands=3-5,n_train=50")
    assert {len(p.steps) for p in problems} == {2}
    assert ArithConfig.parse("ops=3").ops == (3, 3)
    for bad, why in [
        ("ops=0-9", "within 1-8"),
        ("foo=1", "keys"),
        ("ops=a-b", "not a number"),
        ("operands=1-5", "2 <= low"),
    ]:
        with pytest.raises(ValueError, match=why):
            ArithConfig.parse(bad)
    with pytest.raises(ValueError, match="splits"):
        _load("dev")


def _rows(output: str) -> list[dict]:
    fs, root = output_fs(output)
    return [r for f in parquet_files(fs, root) for r in pq.read_table(f).to_pylist()]


def test_annotate_gold_round_trip(ray_cluster, tmp_path: Path) -> None:
    cfg = AnnotateConfig(
        dataset="arith", split="test", dataset_config=CONFIG, seed=1, mode="gold",
        output=str(tmp_path / "gold"),
    )  # fmt: skip
    summary = run(cfg)
    assert (summary["rows"], summary["accepted"]) == (100, 100)
    by_id = {p.id: p for p in _load("test", seed=1)}
    rows = _rows(cfg.output)
    assert len(rows) == 100
    for r in rows:
        assert problem_from_row(r) == by_id[r["id"]]
        assert r["predicted"] == r["answer"] and r["teacher"] == "gold"


def test_the_fault_injecting_teacher_answers_from_arith_gold(ray_cluster, tmp_path: Path) -> None:
    problems = _load("test", config=CONFIG, limit=12)
    with TeacherServer(problems) as server:
        server.set_plan(FaultPlan(per_problem={problems[0].id: ["wrong"]}))
        cfg = AnnotateConfig(
            dataset="arith", split="test", dataset_config=CONFIG, limit=12,
            output=str(tmp_path / "teacher"), base_url=server.base_url, model="test-teacher",
            retry_base=0.01, timeout=5.0, max_in_flight=8,
        )  # fmt: skip
        summary = run(cfg)
    assert (summary["accepted"], summary["rejected_by_reason"]) == (11, {"wrong_answer": 1})
    for r in _rows(cfg.output):
        if r["status"] == "accepted":
            assert [s["answer"] for s in r["steps"]] == [s["answer"] for s in r["gold_steps"]]
