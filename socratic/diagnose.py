"""Each student of the Socratic pair scored alone, against the gold steps.

Why: the pair's accuracy is a product of two students, and a change that helps one can hide
behind the other. Divide-or-Conquer (Wu et al. 2024) found the solver bounds such pipelines;
this measures which student a change helped, on the problems evaluation scores.

* Solver, teacher-forced: for every gold step k it gets the problem, the gold steps before k
  and the gold sub-question k (exactly the prompt it sees in the loop when everything before
  went right) and must give gold answer k. Scored per step, per problem (every step right) and
  by step index.
* Decomposer: its sub-questions against the gold ones: the right count, each question equal
  to the gold one at its place (after `formats.clean`), and every question equal. The last is
  a lower bound on the pipeline's accuracy with a gold solver: a gold solver surely answers the
  gold sub-questions right, while a question worded otherwise may or may not be (measured on
  `arith`: 84 % exact decompositions, 92 % right answers from the trained pair).
* Iterative decomposer (one sub-question per call, `decomposer_form="iterative"`): teacher-forced
  like the solver. At every gold step k it gets the problem and the gold steps before k and
  must write gold question k; after the last gold step it must stop (`formats.END`, or any reply
  without a question: the loop stops on both). The same three figures: count right = it asked
  at every gold step and stopped right after the last; question right per gold step; every
  question exact and the stop right. With a gold solver the history is the gold one as long as
  the questions are exact, so the last figure is the same bound as the "all" decomposer's.
* Both decomposers' wrong questions by kind (`misses`, `miss_kind`): one word off and that
  word copied from elsewhere in the problem (a name read from the wrong sentence), one word off
  and the word nowhere in the problem (a default the student falls back on), another step's
  question, no question at that place, or other. Measured on `arith` (seed 0): 13 and 7 of
  the 20 wrong in-length questions are one word off; the gap to chain of thought, which never
  writes those words, is copying (docs/quality.md).

Both take the `generate(prompts) -> texts` callable of the solving loop (a `Generator`, or its
`complete` with the calculator on), so they score what evaluation and Serve run.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from socratic.answers import answers_match, extract_answer
from socratic.formats import (
    clean,
    decomposer_prompt,
    decomposer_step_prompt,
    parse_decomposer_step,
    parse_decomposition,
    parse_solver,
    solver_prompt,
)
from socratic.records import Problem
from socratic.stats import wilson_interval

Generate = Callable[[list[str]], Sequence[Any]]
MISS_KINDS = ("one word, from the problem", "one word, not in the problem",
              "another step's question", "other", "missing")  # fmt: skip


def _texts(replies: Sequence[Any]) -> list[str]:
    return [r.text if hasattr(r, "text") else str(r) for r in replies]


def _batched(generate: Generate, prompts: list[str], batch_size: int) -> list[str]:
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        out += _texts(generate(prompts[i : i + batch_size]))
    return out


def _share(hits: int, n: int) -> dict[str, Any]:
    if n == 0:
        return {"correct": 0, "total": 0, "accuracy": None, "ci95": None}
    return {"correct": hits, "total": n, "accuracy": round(100 * hits / n, 2),
            "ci95": list(wilson_interval(hits, n))}  # fmt: skip


def _bare(word: str) -> str:
    return word.strip("?.,!;:$").lower()


def miss_kind(mine: str | None, gold: str, golds: Sequence[str], problem: str) -> str:
    """How a sub-question that is not `gold` went wrong (`MISS_KINDS`); `golds` are the
    problem's gold questions, `problem` its text."""
    if mine is None:
        return "missing"
    off = [w for w, g in zip(mine.split(), gold.split(), strict=False) if w != g]
    if len(mine.split()) == len(gold.split()) and len(off) == 1:
        in_problem = _bare(off[0]) in {_bare(w) for w in problem.split()}
        return MISS_KINDS[0] if in_problem else MISS_KINDS[1]
    return MISS_KINDS[2] if mine in golds else "other"


def _misses(problem: str, mine: Sequence[str | None], gold: Sequence[str]) -> list[str]:
    """The kind of every gold place whose question is not the gold one."""
    padded = [*mine, *[None] * (len(gold) - len(mine))]
    return [miss_kind(m, g, gold, problem) for m, g in zip(padded, gold, strict=False) if m != g]


def score_solver(
    problems: Sequence[Problem], generate: Generate, *, batch_size: int = 64
) -> dict[str, Any]:
    """The solver on gold sub-questions with the gold history (teacher forcing)."""
    prompts, where = [], []
    for i, p in enumerate(problems):
        for k, step in enumerate(p.steps):
            prompts.append(solver_prompt(p.question, p.steps[:k], step.question))
            where.append((i, k))
    outs = _batched(generate, prompts, batch_size)
    by_problem: dict[int, list[bool]] = defaultdict(list)
    by_k: dict[int, list[bool]] = defaultdict(list)
    for (i, k), text in zip(where, outs, strict=True):
        gold = extract_answer(problems[i].steps[k].answer)
        ok = gold is not None and answers_match(extract_answer(parse_solver(text)), gold)
        by_problem[i].append(ok)
        by_k[k + 1].append(ok)
    steps = [ok for oks in by_problem.values() for ok in oks]
    return {
        "per_step": _share(sum(steps), len(steps)),
        "per_problem": _share(sum(all(v) for v in by_problem.values()), len(by_problem)),
        "by_step": {k: _share(sum(v), len(v)) for k, v in sorted(by_k.items())},
    }


def score_decomposer(
    problems: Sequence[Problem],
    generate: Generate,
    *,
    batch_size: int = 64,
    decomposer_form: str = "all",
) -> dict[str, Any]:
    """The decomposer's sub-questions against the gold ones (in its form: module doc)."""
    if decomposer_form == "iterative":
        return score_iterative_decomposer(problems, generate, batch_size=batch_size)
    problems = [p for p in problems if p.steps]
    outs = _batched(generate, [decomposer_prompt(p.question) for p in problems], batch_size)
    count = exact = 0
    place_hits = place_total = 0
    misses = dict.fromkeys(MISS_KINDS, 0)
    for p, text in zip(problems, outs, strict=True):
        mine = parse_decomposition(text)
        gold = [clean(s.question) for s in p.steps]
        count += len(mine) == len(gold)
        exact += mine == gold
        place_hits += sum(m == g for m, g in zip(mine, gold, strict=False))
        place_total += len(gold)
        for kind in _misses(p.question, mine, gold):
            misses[kind] += 1
    n = len(problems)
    return {
        "count_right": _share(count, n),
        "question_right": _share(place_hits, place_total),
        "gold_solver_pipeline": _share(exact, n),
        "misses": misses,
    }


def score_iterative_decomposer(
    problems: Sequence[Problem], generate: Generate, *, batch_size: int = 64
) -> dict[str, Any]:
    """The iterative decomposer teacher-forced on the gold history: each gold question at its
    step, then the stop (see the module doc). `stopped_early`: problems where it stopped before
    the last gold step; `ran_on`: problems where it asked one more question after it."""
    problems = [p for p in problems if p.steps]
    prompts, where = [], []
    for i, p in enumerate(problems):
        for k in range(len(p.steps) + 1):
            prompts.append(decomposer_step_prompt(p.question, p.steps[:k]))
            where.append((i, k))
    outs = _batched(generate, prompts, batch_size)
    asked: dict[int, list[str | None]] = defaultdict(list)
    for (i, _), text in zip(where, outs, strict=True):
        asked[i].append(parse_decomposer_step(text))
    count = exact = early = ran_on = 0
    place_hits = place_total = 0
    misses = dict.fromkeys(MISS_KINDS, 0)
    for i, p in enumerate(problems):
        *mine, last = asked[i]
        gold = [clean(s.question) for s in p.steps]
        stops_right = last is None
        early += any(q is None for q in mine)
        ran_on += not stops_right
        count += stops_right and all(q is not None for q in mine)
        exact += stops_right and mine == gold
        place_hits += sum(m == g for m, g in zip(mine, gold, strict=True))
        place_total += len(gold)
        for kind in _misses(p.question, mine, gold):
            misses[kind] += 1
    n = len(problems)
    return {
        "count_right": _share(count, n),
        "question_right": _share(place_hits, place_total),
        "gold_solver_pipeline": _share(exact, n),
        "misses": misses,
        "stopped_early": _share(early, n),
        "ran_on": _share(ran_on, n),
    }
