"""Offline evaluation on Ray Data: real actors holding real models, Parquet read back with pyarrow.

The students are the tiny random GPT-2, so accuracy is near zero; what is checked is that every
problem is scored once per setting, that scores follow from the predictions, and that the Ray
Data path gives exactly what the in-process loop (the one Serve runs) gives on the same model.
"""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.evaluate import (
    PREDICTION_SCHEMA,
    EvaluateConfig,
    Evaluator,
    check_gpus,
    main,
    read_one_pass,
    run,
)
from socratic.adapters import DatasetSpec, load_problems
from socratic.answers import answers_match
from socratic.calculator import evaluate, format_number
from socratic.generate import Generator
from socratic.solve import solve
from socratic.stats import wilson_interval
from tests.support.paths import require_shared
from tests.support.wrong_arith import CASES, DECOMPOSITIONS, wrong_arith_model_dir

TEST = list(load_problems(DatasetSpec("sample", split="test")))


def _rows(out: Path, method: str) -> list[dict]:
    files = sorted((out / "predictions" / method).glob("*.parquet"))
    assert files, f"no predictions for {method}"
    for f in files:
        assert pq.read_schema(f).equals(PREDICTION_SCHEMA)
    return [r for f in files for r in pq.read_table(f).to_pylist()]


def _cfg(model: Path, out: Path, **kw) -> EvaluateConfig:
    base = dict(dataset="sample", split="test", models=str(model.parent), output=str(out))
    roles = {r: str(model) for r in ("decomposer", "solver", "unified", "cot", "answer")}
    return EvaluateConfig(**{**base, **roles, "max_new_tokens": 16, "batch_size": 3, **kw})


@pytest.mark.slow
def test_every_method_scores_every_problem_once(ray_cluster, tiny_model_dir, tmp_path) -> None:
    out = tmp_path / "eval"
    cfg = _cfg(tiny_model_dir, out, methods="iterative,unified,cot,answer", calculator="both")
    summary = run(cfg)

    ids = sorted(p.id for p in TEST)
    gold = {p.id: p.answer for p in TEST}
    iterative = _rows(out, "iterative")
    # Every method that writes arithmetic is scored with the calculator on and off.
    for method in ("iterative", "unified", "cot"):
        rows = _rows(out, method)
        for calculator in (True, False):
            assert sorted(r["id"] for r in rows if r["calculator"] is calculator) == ids
        assert all(r["calculator_forced"] == r["calculator_refused"] == 0
                   for r in rows if r["calculator"] is False)  # fmt: skip
        assert all(r["truncated"] == 0 for r in rows)
    answer = _rows(out, "answer")
    assert sorted(r["id"] for r in answer) == ids and all(r["calculator"] is None for r in answer)
    for method in ("unified", "cot", "answer"):
        rows = _rows(out, method)
        assert all(r["text"] is not None for r in rows)
        for r in rows:  # the predicted answer is what the method's reader makes of the text
            assert r["predicted"] == read_one_pass(method, r["text"], "number")[0]
            assert 0 < r["tokens"] <= 16

    every = iterative + [r for m in ("unified", "cot", "answer") for r in _rows(out, m)]
    for r in every:
        assert r["gold"] == gold[r["id"]]
        assert r["correct"] == answers_match(r["predicted"], r["gold"])

    # The summary and the Markdown table are computed from the Parquet.
    assert json.loads((out / "summary.json").read_text()) == summary
    by = {(r["method"], r["calculator"]): r for r in summary["results"]}
    assert set(by) == {
        ("iterative", True), ("iterative", False), ("unified", True), ("unified", False),
        ("cot", True), ("cot", False), ("answer", None),
    }  # fmt: skip
    for (method, calculator), r in by.items():
        rows = [x for x in every if x["method"] == method and x["calculator"] == calculator]
        assert (r["problems"], r["missing"], r["duplicates"]) == (len(TEST), 0, 0)
        assert r["correct"] == sum(x["correct"] for x in rows)
        assert r["ci95"] == list(wilson_interval(r["correct"], r["problems"]))
        assert r["tokens"] == sum(x["tokens"] for x in rows)
        assert r["calculator_forced"] == sum(x["calculator_forced"] for x in rows)
        assert r["calculator_refused"] == sum(x["calculator_refused"] for x in rows)
        assert r["no_answer"] == sum(not x["predicted"] for x in rows)
        assert r["no_answer_pct"] == round(100 * r["no_answer"] / len(rows), 2)
    assert (summary["answer_kind"], summary["skipped_records"]) == ("number", 0)
    table = (out / "results.md").read_text()
    assert "| Socratic, decomposer + solver | on |" in table
    assert "| Chain of thought | off |" in table and "| Socratic, unified student | on |" in table
    assert "| Answer only | n/a |" in table and "; no answer " in table

    # Same model, same greedy loop in-process: the Ray Data actors must give the same answers,
    # steps and token counts (batched or not).
    gen = Generator(tiny_model_dir, max_new_tokens=16)
    for r in [x for x in iterative if x["calculator"]]:
        sol = solve(r["question"], gen.complete, partial(gen.complete, calculator=True))
        assert (r["predicted"], r["steps"], r["tokens"]) == (
            sol.answer,
            [s.to_dict() for s in sol.steps],
            sol.tokens,
        )

    # A rerun replaces a method's predictions; it never adds a second copy.
    run(_cfg(tiny_model_dir, out, methods="answer"))
    assert len(_rows(out, "answer")) == len(TEST)


def test_the_calculator_is_scored_on_and_off_for_every_method_that_writes_arithmetic(
    tmp_path_factory,
) -> None:
    """An actor's rows, in-process, with a student that learnt wrong arithmetic: on, the spans
    are right and counted; off, the student's own values stand."""
    model = str(wrong_arith_model_dir(tmp_path_factory))
    by_question = {c.prompt.splitlines()[0].removeprefix("Problem: "): c for c in CASES}
    problems = {
        "iterative": list(DECOMPOSITIONS),
        "unified": [q for q, c in by_question.items() if c.prompt.endswith("Steps:\n")],
        "cot": [q for q, c in by_question.items() if c.prompt.endswith("Solution:\n")],
    }
    for method, questions in problems.items():
        items = [{"id": f"t/{i}", "dataset": "t", "split": "test", "question": q, "answer": "1",
                  "answer_kind": "number"} for i, q in enumerate(questions)]  # fmt: skip
        roles = {r: model for r in ("decomposer", "solver", method)}
        actor = Evaluator(method, roles, (True, False), max_steps=2, max_new_tokens=64,
                          num_threads=None)  # fmt: skip
        rows = actor(pa.Table.from_pylist(items)).to_pylist()
        assert [r["calculator"] for r in rows] == [True] * len(items) + [False] * len(items)
        for r in rows:
            text = r["text"] or "\n".join(s["answer"] for s in r["steps"])
            spans = re.findall(r"<<([^<>=]*)=([^<>]*)>>", text)
            assert spans, (method, text)
            right = [v == format_number(evaluate(e)) for e, v in spans]
            if r["calculator"]:
                assert all(right) and r["calculator_forced"] == len(spans), (method, text)
            else:
                assert not any(right) and r["calculator_forced"] == 0, (method, text)
            assert r["calculator_refused"] == 0


def test_gpus_the_cluster_lacks_are_refused_before_any_actor_waits(
    ray_cluster, tiny_model_dir, tmp_path
) -> None:
    cfg = _cfg(tiny_model_dir, tmp_path / "eval", methods="answer", gpus_per_actor=1)
    with pytest.raises(ValueError, match=r"--gpus-per-actor 1 asks for more GPUs .* \(0 GPU"):
        run(cfg)
    check_gpus(cfg, {"CPU": 16, "GPU": 1})  # fits: no error
    with pytest.raises(ValueError, match="--gpus-per-actor"):
        EvaluateConfig(dataset="sample", gpus_per_actor=-1)


def test_a_missing_student_is_named_before_any_work(tmp_path, capsys) -> None:
    rc = main(["--dataset", "sample", "--models", str(tmp_path / "nowhere"),
               "--methods", "iterative", "--output", str(tmp_path / "eval")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert f"decomposer: {tmp_path / 'nowhere' / 'decomposer'}" in err
    assert "trainers/train.py" in err
    assert not (tmp_path / "eval").exists()


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown"):
        EvaluateConfig(dataset="sample", methods="iterative,beam")
    with pytest.raises(SystemExit):
        main(["--dataset", "sample", "--calculator", "sometimes"])


def test_the_summary_reports_the_share_with_no_answer(tmp_path: Path) -> None:
    """Beside accuracy, each row says how many outputs had no answer to read (a student that
    never writes one needs another fix than one that answers wrong); from hand-made Parquet."""
    from pipelines.evaluate import format_summary, results_markdown, summarize
    from pipelines.journal import output_fs

    out = tmp_path / "eval"
    (out / "predictions" / "answer").mkdir(parents=True)
    base = {"dataset": "sample", "split": "test", "method": "answer", "calculator": None,
            "question": "q", "gold": "4", "steps": [], "text": "", "tokens": 2,
            "fallback": False, "calculator_forced": 0, "calculator_refused": 0,
            "truncated": 0}  # fmt: skip
    rows = [{**base, "id": "a", "predicted": "4", "correct": True},
            {**base, "id": "b", "predicted": None, "correct": False},
            {**base, "id": "c", "predicted": "5", "correct": False}]  # fmt: skip
    table = pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA)
    pq.write_table(table, out / "predictions" / "answer" / "part-0.parquet")
    cfg = EvaluateConfig(dataset="sample", methods="answer", output=str(out))
    summary = summarize(cfg, *output_fs(str(out)), 3, 1.0)
    (r,) = summary["results"]
    assert (r["correct"], r["no_answer"], r["no_answer_pct"]) == (1, 1, 33.33)
    assert "| Answer only | n/a | 33.3 (1/3) [6.1, 79.2]; no answer 33.3 % |" in results_markdown(
        summary
    )
    assert "33.33 % [6.1, 79.2] (1/3), no answer 33.3 %, 2.0 tokens/problem" in format_summary(
        summary
    )


def test_each_answer_kind_is_read_and_scored_as_its_kind() -> None:
    """Custom datasets' kinds: a choice letter and a short text, read from a one-pass student's
    text and scored (`Evaluator._row`) as the judge compares them."""
    assert read_one_pass("answer", "Answer: (c)\n", "choice") == ("C", [])
    assert read_one_pass("cot", "It is east of Africa.\nAnswer: the indian ocean\n", "text") == (
        "the indian ocean",
        [],
    )
    actor = Evaluator.__new__(Evaluator)  # no models needed to score a row
    actor.method = "answer"
    item = {"id": "custom/test/0", "dataset": "custom", "split": "test", "question": "q"}
    text = {**item, "answer": "Indian Ocean", "answer_kind": "text"}
    assert actor._row(text, "the indian ocean!")["correct"] is True
    assert actor._row(text, "Pacific")["correct"] is False
    choice = {**item, "answer": "C", "answer_kind": "choice"}
    assert actor._row(choice, "C")["correct"] is True
    assert actor._row(choice, None)["correct"] is False


def test_one_pass_readers() -> None:
    assert read_one_pass("unified", "Q1: How many?\nA1: 3*4 = 12\n", "number") == (
        "12",
        [{"question": "How many?", "answer": "3*4 = 12"}],
    )
    assert read_one_pass("unified", "no format at all, maybe 7", "number")[0] == "7"
    assert read_one_pass("cot", "She has 3+4 = 7.\nAnswer: 7\n", "number") == ("7", [])
    assert read_one_pass("answer", "Answer: yes\n", "yesno") == ("yes", [])
    assert read_one_pass("answer", "", "number") == (None, [])


@pytest.mark.shared_data
def test_yes_no_problems_are_scored_as_yes_no(ray_cluster, tiny_model_dir, tmp_path) -> None:
    """StrategyQA answers are yes/no: the loop must read a yes/no, not a number, from the text."""
    dev = require_shared("strategyqa/dev.json")
    out = tmp_path / "eval"
    cfg = _cfg(
        tiny_model_dir, out, dataset="strategyqa", split="dev", path=str(dev), limit=3,
        methods="iterative", max_steps=2,
    )  # fmt: skip
    run(cfg)
    rows = _rows(out, "iterative")
    assert len(rows) == 3
    assert all(r["gold"] in ("yes", "no") for r in rows)
    assert all(r["predicted"] in ("yes", "no", None) for r in rows)


def _summary(dataset: str, correct: int) -> dict:
    result = {"dataset": dataset, "split": "test", "problems": 4, "correct": correct,
              "accuracy": 25.0 * correct, "missing": 0, "duplicates": 0}  # fmt: skip
    return {
        "dataset": dataset,
        "split": "test",
        "models": {"decomposer": f"students/{dataset}/decomposer"},
        "results": [
            {**result, "method": "iterative", "calculator": True},
            {**result, "method": "answer", "calculator": None, "correct": 0, "accuracy": 0.0},
        ],
    }


def test_runs_merge_into_one_table_with_a_column_per_dataset(tmp_path: Path, capsys) -> None:
    for name, correct in (("gsm8k", 1), ("svamp", 3)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(_summary(name, correct)))
    out = tmp_path / "table" / "results.md"
    assert main(["table", str(tmp_path / "gsm8k"), str(tmp_path / "svamp"),
                 "--output", str(out)]) == 0  # fmt: skip
    table = out.read_text()
    assert table == capsys.readouterr().out.rstrip("\n") + "\n"
    lines = table.splitlines()
    assert lines[0] == "| method | calculator | gsm8k | svamp |"
    # The paper's order: baselines first, the Socratic pair last; one row per method/setting.
    assert lines[2] == "| Answer only | n/a | 0.0 (0/4) | 0.0 (0/4) |"
    assert lines[3] == "| Socratic, decomposer + solver | on | 25.0 (1/4) | 75.0 (3/4) |"
    merged = json.loads(out.with_suffix(".json").read_text())
    assert merged["models"]["svamp decomposer"] == "students/svamp/decomposer"
    assert main(["table", str(tmp_path / "nowhere")]) == 2
