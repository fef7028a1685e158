"""Each student scored alone: teacher-forced solver and decomposer-against-gold figures."""

from __future__ import annotations

import pytest

from socratic.arith import ArithConfig, generate
from socratic.diagnose import score_decomposer, score_solver
from socratic.formats import decomposer_prompt, decomposer_target, solver_prompt, solver_target
from socratic.stats import mean_spread, wilson_interval

PROBLEMS = list(generate(ArithConfig.parse("ops=2-3,n_train=0,n_test=12,n_long=0"), 0, "test"))


def oracle_solver(wrong: set[tuple[int, int]]):
    """Answers every gold prompt with its gold answer, except (problem, step) pairs in `wrong`,
    which get a wrong result; it also records every prompt it was asked."""
    answers, asked = {}, []
    for i, p in enumerate(PROBLEMS):
        for k, s in enumerate(p.steps):
            text = solver_target(k + 1, s.answer)
            if (i, k) in wrong:
                text = f"A{k + 1}: {p.steps[k].answer.split()[0]} has 999999 apples."
            answers[solver_prompt(p.question, p.steps[:k], s.question)] = text

    def gen(prompts: list[str]) -> list[str]:
        asked.extend(prompts)
        return [answers[p] for p in prompts]

    return gen, asked


def test_the_solver_is_scored_per_step_per_problem_and_by_step_on_gold_prompts() -> None:
    wrong = {(0, 1), (3, 0), (3, 1)}
    gen, asked = oracle_solver(wrong)
    r = score_solver(PROBLEMS, gen, batch_size=5)
    n_steps = sum(len(p.steps) for p in PROBLEMS)
    assert len(asked) == n_steps  # every gold step once, in batches of 5
    assert r["per_step"]["correct"] == n_steps - 3 and r["per_step"]["total"] == n_steps
    assert r["per_problem"]["correct"] == len(PROBLEMS) - 2
    assert r["by_step"][1]["correct"] == len(PROBLEMS) - 1
    assert r["by_step"][2]["correct"] == len(PROBLEMS) - 2
    lo, hi = r["per_problem"]["ci95"]
    assert lo < r["per_problem"]["accuracy"] < hi


def test_the_decomposer_is_compared_with_the_gold_sub_questions() -> None:
    def gen(prompts: list[str]) -> list[str]:
        out = []
        for i, p in enumerate(PROBLEMS):
            assert prompts[i] == decomposer_prompt(p.question)
            qs = [s.question for s in p.steps]
            if i == 0:
                qs = qs[:-1]  # one question short
            elif i == 1:
                qs[0] = "How many?"  # right count, one question wrong
            out.append(decomposer_target(qs) + "\nA1: runs on")
        return out

    r = score_decomposer(PROBLEMS, gen)
    n = len(PROBLEMS)
    assert r["count_right"]["correct"] == n - 1
    assert r["gold_solver_pipeline"]["correct"] == n - 2
    total = sum(len(p.steps) for p in PROBLEMS)
    assert r["question_right"] == {**r["question_right"], "correct": total - 2, "total": total}
    assert r["misses"] == {"one word, from the problem": 0, "one word, not in the problem": 0,
                           "another step's question": 0, "other": 1, "missing": 1}  # fmt: skip


def test_a_wrong_question_is_told_apart_by_how_it_went_wrong() -> None:
    """The decomposer's misses by kind: one word read from elsewhere in the problem (a name of
    another sentence), one word the problem does not hold (a default item), the question of
    another step, none at all there, or other."""
    from socratic.diagnose import miss_kind

    problem = ("Noah has $13. Noah spends $8 on a hat. Leo has 9 times as much money as Noah. "
               "How much money does Leo have?")  # fmt: skip
    gold = ["How much money does Noah have after buying a hat?", "How much money does Leo have?"]
    assert miss_kind("How much money does Noah have?", gold[1], gold, problem) == (
        "one word, from the problem")
    assert miss_kind("How much money does Noah have after buying a plant?", gold[0], gold,
                     problem) == "one word, not in the problem"  # fmt: skip
    assert miss_kind(gold[1], gold[0], gold, problem) == "another step's question"
    assert miss_kind("How many?", gold[0], gold, problem) == "other"
    assert miss_kind(None, gold[0], gold, problem) == "missing"


def test_wilson_interval_and_spread() -> None:
    assert wilson_interval(0, 100) == (0.0, 3.7)
    assert wilson_interval(50, 100) == (40.4, 59.6)
    assert wilson_interval(100, 100) == (96.3, 100.0)
    with pytest.raises(ValueError, match="at least one"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="within"):
        wilson_interval(5, 4)
    assert mean_spread([50.0]) == (50.0, 0.0)
    m, sd = mean_spread([40.0, 50.0, 60.0])
    assert m == 50.0 and sd == pytest.approx(10.0)


def test_the_iterative_decomposer_is_teacher_forced_step_by_step_then_must_stop() -> None:
    from socratic.diagnose import score_decomposer
    from socratic.formats import END, decomposer_step_prompt, decomposer_step_target

    asked: list[str] = []
    replies = {}
    for i, p in enumerate(PROBLEMS):
        n = len(p.steps)
        for k in range(n + 1):
            reply = decomposer_step_target(k + 1, p.steps[k].question if k < n else None)
            if i == 0 and k == n:
                reply = f"Q{k + 1}: And then?"  # runs on past the last step
            elif i == 1 and k == 1:
                reply = END  # stops one step early
            elif i == 2 and k == 0:
                reply = "Q1: How many?"  # asks, but not the gold question
            elif i == 3 and k == n:
                reply = "no idea"  # no question: the loop stops on it, so it counts as a stop
            replies[decomposer_step_prompt(p.question, p.steps[:k])] = reply

    def gen(prompts: list[str]) -> list[str]:
        asked.extend(prompts)
        return [replies[x] for x in prompts]

    r = score_decomposer(PROBLEMS, gen, batch_size=7, decomposer_form="iterative")
    n = len(PROBLEMS)
    assert len(asked) == sum(len(p.steps) + 1 for p in PROBLEMS)  # every gold step, and the end
    assert r["count_right"]["correct"] == n - 2  # problem 0 ran on, problem 1 stopped early
    assert r["gold_solver_pipeline"]["correct"] == n - 3  # and problem 2 asked a wrong question
    assert (r["stopped_early"]["correct"], r["ran_on"]["correct"]) == (1, 1)
    total = sum(len(p.steps) for p in PROBLEMS)
    assert r["question_right"] == {**r["question_right"], "correct": total - 2, "total": total}
    # problem 1 stopped before its second question; problem 2's first is not the gold one
    assert (r["misses"]["missing"], r["misses"]["other"]) == (1, 1)
