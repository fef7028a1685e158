"""The solving loop, driven three ways (sync, async, lockstep batches) over the same generator."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from socratic.formats import decomposer_prompt, decomposer_step_prompt, solver_prompt
from socratic.records import Step
from socratic.solve import Solved, fallback_question, solve, solve_async, solve_many

PROBLEM = "Ann has 3 bags of 4 apples and buys 2 more. How many apples does she have?"


class Scripted:
    """A stand-in student: answers from a table keyed by the prompt, and records every call."""

    def __init__(self, table: dict[str, str]) -> None:
        self.table, self.calls = table, []

    def __call__(self, prompts: list[str]) -> list[str]:
        self.calls.append(list(prompts))
        return [self.table[p] for p in prompts]


def _models(problem: str = PROBLEM, wrong: bool = True) -> tuple[Scripted, Scripted]:
    s1 = Step("How many apples are in the bags?", "3*4 = <<3*4=12>>12")
    dec = Scripted({decomposer_prompt(problem): f"Q1: {s1.question}\nQ2: How many in all?\nQ3"})
    sol = Scripted({
        solver_prompt(problem, [], s1.question): "A1: 3*4 = <<3*4=13>>13" if wrong else "A1: 12",
        solver_prompt(problem, [s1], "How many in all?"): "A2: 12+2 = <<12+2=14>>14 apples\nQ3",
        solver_prompt(problem, [Step(s1.question, "3*4 = <<3*4=13>>13")], "How many in all?"):
            "A2: 13+2 = <<13+2=15>>15 apples",
    })  # fmt: skip
    return dec, sol


def test_solver_is_called_once_per_sub_question_with_the_growing_history() -> None:
    dec, sol = _models()
    result = solve(PROBLEM, dec, sol)
    assert result.answer == "14"
    assert [s.answer for s in result.steps] == ["3*4 = <<3*4=12>>12", "12+2 = <<12+2=14>>14 apples"]
    assert len(dec.calls) == 1 and len(sol.calls) == 2
    assert sol.calls[1][0].count("\nA1: 3*4 = <<3*4=12>>12\n") == 1  # corrected history
    assert set(result.timings) == {"decompose_s", "step1_s", "step2_s", "total_s"}
    assert result.to_dict()["steps"][0] == {
        "question": "How many apples are in the bags?",
        "answer": "3*4 = <<3*4=12>>12",
    }


def test_calculator_off_keeps_the_students_arithmetic() -> None:
    dec, sol = _models()
    assert solve(PROBLEM, dec, sol, calculator=False).answer == "15"


def test_max_steps_and_fallback() -> None:
    dec, sol = _models()
    assert len(solve(PROBLEM, dec, sol, max_steps=1).steps) == 1
    assert fallback_question(PROBLEM) == "How many apples does she have?"
    dec = Scripted({decomposer_prompt(PROBLEM): "I am not sure."})
    sol = Scripted({solver_prompt(PROBLEM, [], "How many apples does she have?"): "A1: 14"})
    result = solve(PROBLEM, dec, sol)
    assert result.fallback and result.answer == "14"
    with pytest.raises(ValueError, match="max_steps"):
        solve(PROBLEM, dec, sol, max_steps=0)


def test_an_unanswered_last_step_is_no_answer_for_every_kind() -> None:
    """The placeholder the loop records for an empty solver reply is never read as an answer:
    a text kind would otherwise score the words "no answer"."""
    q = "How many apples does she have?"
    dec = Scripted({decomposer_prompt(PROBLEM): f"Q1: {q}"})
    sol = Scripted({solver_prompt(PROBLEM, [], q): ""})
    for kind in ("number", "text"):
        result = solve(PROBLEM, dec, sol, answer_kind=kind)
        assert result.steps[-1].answer == "(no answer)" and result.answer is None, kind


def test_async_driver_streams_each_final_step_in_order() -> None:
    dec, sol = _models()
    seen: list[Solved] = []

    async def a_dec(p: str) -> str:
        return dec([p])[0]

    async def a_sol(p: str) -> str:
        return sol([p])[0]

    async def on_step(event: Solved) -> None:
        seen.append(event)

    result = asyncio.run(solve_async(PROBLEM, a_dec, a_sol, on_step=on_step))
    assert [e.k for e in seen] == [1, 2]
    assert [e.step for e in seen] == result.steps and result.answer == "14"


def test_lockstep_batches_give_the_same_answers_with_one_batch_per_round() -> None:
    other = "Bo has 10 pens. How many pens does Bo have?"
    dec, sol = _models()
    dec.table[decomposer_prompt(other)] = "Q1: How many pens?"
    sol.table[solver_prompt(other, [], "How many pens?")] = "A1: 10"
    results = solve_many([PROBLEM, other, PROBLEM], dec, sol)
    assert [r.answer for r in results] == ["14", "10", "14"]
    assert [len(c) for c in dec.calls] == [3]
    assert [len(c) for c in sol.calls] == [3, 2]  # round 1: everyone; round 2: two problems left


def test_loop_runs_with_a_real_hf_model(tiny_model_dir) -> None:
    """An untrained tiny model writes nonsense; the loop must still end with a Solution."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)

    def generate(prompts: list[str]) -> list[str]:
        batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=12, do_sample=False)
        return tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)

    results = solve_many([PROBLEM, "Is it? How many?"], generate, generate, max_steps=3)
    assert len(results) == 2
    assert all(1 <= len(r.steps) <= 3 for r in results)


def test_the_fallback_fix_is_only_for_text_that_bypassed_decodings_calculator() -> None:
    """A Completion decoded with the calculator is kept as decoded and its counts add up; a
    plain string (or one decoded without it) gets the after-the-fact fix."""
    from socratic.generate import Completion

    dec, sol = _models()

    def as_completion(fn: Scripted, **kw) -> Callable[[list[str]], list[Completion]]:
        return lambda prompts: [Completion(t, 1, 2, "stop", **kw) for t in fn(prompts)]

    decoded = as_completion(
        sol, calculator=True, calculator_forced=1, calculator_refused=1, calculator_errors=("x",)
    )
    result = solve(PROBLEM, dec, decoded)
    assert result.steps[0].answer == "3*4 = <<3*4=13>>13"  # as decoded: no rewrite
    assert (result.calculator_forced, result.calculator_refused) == (2, 2)
    assert result.calculator_errors == ["x", "x"] and result.tokens == 4
    bypassed = solve(PROBLEM, dec, as_completion(sol, truncated=True))
    assert bypassed.steps[0].answer == "3*4 = <<3*4=12>>12" and bypassed.truncated == 2
    with pytest.raises(ValueError, match="calculator is off"):
        solve(PROBLEM, dec, decoded, calculator=False)


# --- the iterative decomposer: one sub-question per call, given the answers so far -------------

S1 = Step("How many apples are in the bags?", "3*4 = <<3*4=12>>12")
S2 = Step("How many apples does she have?", "12+2 = <<12+2=14>>14")


def _iterative_models(end: str = "Done.") -> tuple[Scripted, Scripted]:
    """A decomposer scripted on the iterative prompts (problem + the steps so far) and a solver
    that answers each question right; `end` is what the decomposer says after step 2."""
    dec = Scripted({
        decomposer_step_prompt(PROBLEM, []): f"Q1: {S1.question}\nQ2: ignored, one per call",
        decomposer_step_prompt(PROBLEM, [S1]): f"Q2: {S2.question}",
        decomposer_step_prompt(PROBLEM, [S1, S2]): end,
        decomposer_step_prompt(PROBLEM, [S1, S2, Step("And more?", "14")]): "Done.",
    })  # fmt: skip
    sol = Scripted({
        solver_prompt(PROBLEM, [], S1.question): f"A1: {S1.answer}",
        solver_prompt(PROBLEM, [S1], S2.question): f"A2: {S2.answer}",
        solver_prompt(PROBLEM, [S1, S2], "And more?"): "A3: 14",
    })  # fmt: skip
    return dec, sol


def test_iterative_decomposer_alternates_with_the_solver_until_the_end_marker() -> None:
    dec, sol = _iterative_models()
    result = solve(PROBLEM, dec, sol, decomposer_form="iterative")
    assert result.answer == "14" and result.steps == [S1, S2] and not result.fallback
    assert result.decomposition == [S1.question, S2.question]
    # decomposer, solver, decomposer, solver, decomposer ("Done."): three asks, each with the
    # steps answered so far (the solver's corrected answers)
    assert [c[0] for c in dec.calls] == [
        decomposer_step_prompt(PROBLEM, []),
        decomposer_step_prompt(PROBLEM, [S1]),
        decomposer_step_prompt(PROBLEM, [S1, S2]),
    ]
    assert len(sol.calls) == 2
    assert set(result.timings) == {"decompose_s", "step1_s", "step2_s", "total_s"}


def test_iterative_loop_respects_max_steps_and_ends_on_an_unusable_reply() -> None:
    dec, sol = _iterative_models(end="Q3: And more?")
    assert len(solve(PROBLEM, dec, sol, decomposer_form="iterative").steps) == 3
    dec, sol = _iterative_models(end="Q3: And more?")
    result = solve(PROBLEM, dec, sol, decomposer_form="iterative", max_steps=2)
    assert result.steps == [S1, S2] and len(dec.calls) == 2  # no call after the last step
    dec, sol = _iterative_models(end="I have no idea")  # after step 1: ends like "Done."
    result = solve(PROBLEM, dec, sol, decomposer_form="iterative")
    assert result.steps == [S1, S2] and result.answer == "14" and not result.fallback


def test_iterative_loop_falls_back_at_step_one_only() -> None:
    for first in ("Done.", "nonsense"):
        dec = Scripted({decomposer_step_prompt(PROBLEM, []): first})
        sol = Scripted({solver_prompt(PROBLEM, [], "How many apples does she have?"): "A1: 14"})
        result = solve(PROBLEM, dec, sol, decomposer_form="iterative")
        assert result.fallback and result.answer == "14" and len(result.steps) == 1
        assert len(dec.calls) == 1  # the fallback question is the last one asked
    with pytest.raises(ValueError, match="decomposer_form"):
        solve(PROBLEM, dec, sol, decomposer_form="each")


def test_iterative_lockstep_and_async_drivers_agree_and_all_is_unchanged() -> None:
    dec, sol = _iterative_models()
    many = solve_many([PROBLEM, PROBLEM], dec, sol, decomposer_form="iterative")
    assert [r.answer for r in many] == ["14", "14"]
    assert [len(c) for c in dec.calls] == [2, 2, 2] and [len(c) for c in sol.calls] == [2, 2]

    async def a_dec(p: str) -> str:
        return dec([p])[0]

    async def a_sol(p: str) -> str:
        return sol([p])[0]

    one = asyncio.run(solve_async(PROBLEM, a_dec, a_sol, decomposer_form="iterative"))
    assert one.steps == many[0].steps
    # "all", the default, still asks the decomposer once for every question
    dec, sol = _models()
    assert len(solve(PROBLEM, dec, sol, decomposer_form="all").steps) == 2
    assert len(dec.calls) == 1


def test_a_model_dir_says_its_decomposer_form(tmp_path) -> None:
    import json

    from socratic.solve import PROVENANCE_FILE, decomposer_form_of
    from trainers.export import PROVENANCE_FILE as EXPORTED

    assert PROVENANCE_FILE == EXPORTED  # the reader reads what export writes
    assert decomposer_form_of(tmp_path) == "all"  # no provenance: an older export, a hub id
    assert decomposer_form_of("s3://bucket/decomposer") == "all"
    (tmp_path / PROVENANCE_FILE).write_text(json.dumps({"decomposer_form": "iterative"}))
    assert decomposer_form_of(tmp_path) == "iterative"
    (tmp_path / PROVENANCE_FILE).write_text(json.dumps({"config": {"decomposer_form": "all"}}))
    assert decomposer_form_of(str(tmp_path)) == "all"
    (tmp_path / PROVENANCE_FILE).write_text(json.dumps({"decomposer_form": "each"}))
    with pytest.raises(ValueError, match="unknown decomposer_form"):
        decomposer_form_of(tmp_path)
