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
