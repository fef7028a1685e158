"""The bundled sample is ours, well-formed, and arithmetically right, step by step."""

from __future__ import annotations

import re

from socratic.adapters import DatasetSpec, load_problems
from socratic.answers import answers_match, extract_answer
from socratic.calculator import apply_calculator, evaluate, format_number
from socratic.formats import ROLES, examples_for

SPAN = re.compile(r"<<([^=>]+)=([^>]+)>>")


def test_every_calculator_span_is_right_and_the_last_step_is_the_answer() -> None:
    problems = list(load_problems(DatasetSpec("sample", split="all")))
    assert len(problems) == 40
    assert len({p.question for p in problems}) == 40
    spans = 0
    for p in problems:
        assert 2 <= len(p.steps) <= 5, p.id
        for s in p.steps:
            found = SPAN.findall(s.answer)
            assert found, (p.id, s.answer)
            for expr, claimed in found:
                assert format_number(evaluate(expr)) == claimed, (p.id, expr, claimed)
                spans += 1
            assert apply_calculator(s.answer).text == s.answer  # nothing for it to correct
        assert answers_match(extract_answer(p.steps[-1].answer), p.answer), p.id
    assert spans >= 100


def test_every_role_builds_from_every_sample_problem() -> None:
    for p in load_problems(DatasetSpec("sample", split="all")):
        for role in ROLES:
            examples = examples_for(
                role, problem=p.question, steps=p.steps, solution=p.solution, answer=p.answer
            )
            assert len(examples) == (len(p.steps) if role == "solver" else 1)
