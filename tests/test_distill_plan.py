"""The benchmark plans each role's steps on the sequences the trainer really trains on."""

from __future__ import annotations

from pathlib import Path

from pipelines.quality import QualityConfig, plan_steps, problems_of, train_examples
from trainers.data import build_examples, tokenize
from trainers.scratch import build_student


def test_socratic_pair_sees_its_data_equally_often_with_the_packed_solver(tmp_path: Path) -> None:
    cfg = QualityConfig(dataset_config="ops=2-2,operands=2-9,n_train=60,n_test=4,n_long=0",
                        methods="iterative", budget="both", budget_tokens=200_000,
                        warmup_steps=1)  # fmt: skip
    problems = problems_of(cfg, "train", None)
    texts = [p.question + s.answer for p in problems for s in p.steps]
    base = build_student(tmp_path / "base", texts)
    plan = plan_steps(cfg, problems, str(base))
    # the docstring's promise: per method, the pair shares one budget so both see the data as
    # often; per student (the paper's setting), each student trains on the whole budget
    split, each = plan["iterative-split"], plan["iterative"]
    assert abs(split["decomposer"]["epochs"] - split["solver"]["epochs"]) < 0.1, plan
    assert abs(sum(r["budget_tokens"] for r in split.values()) - cfg.budget_tokens) <= 1
    assert all(r["budget_tokens"] == cfg.budget_tokens for r in each.values())
    assert each["solver"]["steps"] > split["solver"]["steps"]
    # and the solver's planned sequences are the trainer's packed ones (one per problem)
    rows = [{"question": p.question, "answer": p.answer,
             "steps": [{"question": s.question, "answer": s.answer} for s in p.steps]}
            for p in problems]  # fmt: skip
    packed, _ = build_examples(rows, "solver", packed=True)
    assert packed == train_examples(problems, "solver")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    mean = sum(tokenize(packed, tok, cfg.max_length).lengths) / len(packed)
    assert each["solver"]["mean_tokens"] == round(mean, 1)


def test_a_shared_pair_is_one_student_with_the_pair_s_budget(tmp_path: Path) -> None:
    """--pair-weights shared: one run, `decomposer+solver`, on both roles' examples (what the
    trainer builds), with the budget of two students per student and of one per method."""
    from dataclasses import replace

    from pipelines.quality import entries

    cfg = QualityConfig(dataset_config="ops=2-2,operands=2-9,n_train=60,n_test=4,n_long=0",
                        methods="iterative,cot", budget="both", budget_tokens=200_000,
                        warmup_steps=1, pair_weights="shared")  # fmt: skip
    assert [e.roles for e in entries(cfg)] == [("decomposer+solver",)] * 2 + [("cot",)]
    problems = problems_of(cfg, "train", None)
    base = build_student(tmp_path / "base", [p.question for p in problems])
    plan = plan_steps(cfg, problems, str(base))
    (each,), (split,) = plan["iterative"].values(), plan["iterative-split"].values()
    assert each["budget_tokens"] == 2 * cfg.budget_tokens == 2 * split["budget_tokens"]
    assert plan["cot"]["cot"]["budget_tokens"] == cfg.budget_tokens
    rows = [{"question": p.question, "answer": p.answer,
             "steps": [{"question": s.question, "answer": s.answer} for s in p.steps]}
            for p in problems]  # fmt: skip
    union, _ = build_examples(rows, "decomposer+solver", packed=True)
    assert union == train_examples(problems, "decomposer+solver")
    assert each["examples"] == len(union) == 2 * len(problems)
    step_tokens = cfg.batch_size * each["mean_tokens"]  # the tokens of two students' budget
    assert abs(each["steps"] * step_tokens - 2 * cfg.budget_tokens) <= step_tokens
    separate = plan_steps(replace(cfg, pair_weights="separate"), problems, str(base))
    assert set(separate["iterative"]) == {"decomposer", "solver"}


def test_on_policy_steps_take_the_decomposer_s_questions_and_the_gold_answers() -> None:
    from pipelines.quality import on_policy_steps

    gold = [{"question": "How many apples?", "answer": "3*4 = <<3*4=12>>12"},
            {"question": "How many in all?", "answer": "12+2 = <<12+2=14>>14"}]  # fmt: skip
    got = on_policy_steps(gold, "Q1: How many bags?\nQ2: How many in all?")
    assert got == [{"question": "How many bags?", "answer": gold[0]["answer"]}, gold[1]]
    assert on_policy_steps(gold, "Q1: How many bags?") is None  # cannot be aligned
    assert on_policy_steps(gold, "Q1: How many bags?\nQ2: \nQ3: x") == [
        {"question": "How many bags?", "answer": gold[0]["answer"]},
        {"question": "x", "answer": gold[1]["answer"]}]  # as the loop parses it: empty skipped
    assert on_policy_steps(gold, "Q1: a\nQ2: b\nQ3: c") is None


def test_on_policy_data_is_annotation_parquet_the_trainer_reads(
    ray_cluster, tmp_path: Path
) -> None:
    """The real path: annotate --mode gold, a student's replies, the Parquet the solver trains
    on. An untrained student cannot be aligned, so every drawn problem keeps its gold steps,
    counted, and no row is lost. On the session's Ray cluster: annotating starts one
    otherwise, and a later `ray_cluster` would then fail to start its own."""
    from pipelines.quality import annotate_gold, entries, on_policy_data

    cfg = QualityConfig(dataset_config="ops=2-2,operands=2-9,n_train=40,n_test=4,n_long=0",
                        methods="iterative", output=str(tmp_path), solver_data="on-policy",
                        on_policy_share=0.5)  # fmt: skip
    problems = problems_of(cfg, "train", None)
    ann = annotate_gold(cfg)["output"]
    build_student(tmp_path / "students" / "decomposer", [p.question for p in problems])
    path, info = on_policy_data(cfg, entries(cfg)[0], ann, max_new_tokens=8)
    assert info["problems"] == 40 and info["drawn"] == 20
    assert info["count differs, gold kept"] == 20  # random weights write no Q lines
    gold, rows = build_examples_rows(ann), build_examples_rows(path)
    assert rows == gold  # nothing aligned, so every row is the gold one


def build_examples_rows(path: str) -> list[tuple]:
    from trainers.data import read_accepted

    return sorted((r["id"], str(r["steps"])) for r in read_accepted(path))


def test_an_epoch_budget_gives_every_student_the_same_passes(tmp_path: Path) -> None:
    """--budget-epochs: per student every student (a shared one over both roles' examples)
    trains E passes; per method the pair's students share them, half each."""
    from dataclasses import replace

    import pytest

    cfg = QualityConfig(dataset_config="ops=2-2,operands=2-9,n_train=64,n_test=4,n_long=0",
                        methods="iterative,cot,answer", budget="both", budget_epochs=2.0,
                        warmup_steps=1)  # fmt: skip
    problems = problems_of(cfg, "train", None)
    base = build_student(tmp_path / "base", [p.question for p in problems])
    plan = plan_steps(cfg, problems, str(base))
    steps = 2 * len(problems) // cfg.batch_size  # 8 for every student, whatever its length
    assert {r["steps"] for m in ("iterative", "cot", "answer") for r in plan[m].values()} == {steps}
    assert {r["steps"] for r in plan["iterative-split"].values()} == {steps // 2}
    assert plan["iterative"]["solver"]["budget_tokens"] > plan["cot"]["cot"]["budget_tokens"]
    shared = plan_steps(replace(cfg, pair_weights="shared"), problems, str(base))
    assert shared["iterative"]["decomposer+solver"]["steps"] == 2 * steps
    assert shared["iterative-split"]["decomposer+solver"]["steps"] == steps
    with pytest.raises(ValueError, match="--budget-epochs must be > 0"):
        QualityConfig(budget_epochs=0)
    with pytest.raises(ValueError, match="one budget in two units"):
        QualityConfig(budget_epochs=1.0, budget_tokens=1000)
