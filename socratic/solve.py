"""The solving loop: the decomposer asks, the solver answers, the last answer is the answer.

It is written once, without I/O, as a generator that yields `(role, prompt)` and is sent back the
model's text, so that the same loop runs wherever the models are: `solve` drives it with plain
functions (tests, notebooks), `solve_async` with awaitables (the Ray Serve ingress, one request
at a time, streaming each step), and `solve_many` drives many problems in lockstep so each model
sees one batch per step (offline evaluation on Ray Data). None of them can drift from the others.

The loop: decompose the problem into sub-questions (at most `max_steps`); for each, give the
solver the problem, every earlier (sub-question, answer) pair and the next sub-question; the
final answer is read from the last sub-answer with `socratic.answers.extract_answer`.

Calculator (on by default): solver answers keep GSM8K annotations (`48/2 = <<48/2=24>>24`), and
small students set up arithmetic far better than they carry it out. As in the GSM8K paper, the
result is forced inside decoding: give the loop a solver that runs `Generator.complete(...,
calculator=True)` (e.g. `functools.partial(gen.complete, calculator=True)`); its Completions
say so, and carry how many results were forced and how many expressions were refused. Text that
bypassed it (a solver returning plain strings, or a Completion decoded without the calculator)
gets the after-the-fact fix instead, `socratic.calculator.apply_calculator`, before the answer
is kept - and so before later steps see it. Turn it off to measure the student's own arithmetic.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, field

from socratic.answers import extract_answer
from socratic.calculator import apply_calculator
from socratic.formats import (
    clean,
    decomposer_prompt,
    parse_decomposition,
    parse_solver,
    solver_prompt,
)
from socratic.generate import Completion
from socratic.records import Step

DECOMPOSER = "decomposer"
SOLVER = "solver"
DEFAULT_MAX_STEPS = 8

# A model is any callable from prompts to texts. It may return `Completion`s instead (text plus
# token counts): then every Solution also says how many tokens its problem cost.
Reply = str | Completion
Generate = Callable[[list[str]], list[str] | list[Completion]]
AsyncGenerate = Callable[[str], Awaitable[Reply]]


@dataclass(frozen=True)
class Ask:
    """The loop needs `role` to complete `prompt`; send it the text."""

    role: str
    prompt: str


@dataclass(frozen=True)
class Solved:
    """Step `k` is final (calculator applied); send None. Lets a server stream steps."""

    k: int
    step: Step


Event = Ask | Solved


@dataclass
class Solution:
    """What the loop produced for one problem, with where its time went."""

    problem: str
    answer: str | None
    steps: list[Step]
    decomposition: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    calculator_errors: list[str] = field(default_factory=list)  # why each refusal was refused
    fallback: bool = False  # the decomposer gave no sub-question; the problem's own was used
    tokens: int = 0  # generated tokens over every call, when the models return Completions
    calculator_forced: int = 0  # results forced inside decoding (Completions only)
    calculator_refused: int = 0  # expressions the calculator refused, in decoding or after
    truncated: int = 0  # model calls whose prompt was cut to fit the model (Completions only)

    def to_dict(self) -> dict:
        """The served reply: `truncated` > 0 says a prompt was cut to fit the model (the
        oldest steps left out), as evaluation's rows say it."""
        return {
            "answer": self.answer,
            "steps": [s.to_dict() for s in self.steps],
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "truncated": self.truncated,
        }


_LAST_QUESTION = re.compile(r"([^.?!]*\?)\s*$")


def fallback_question(problem: str) -> str:
    """The problem's own final question, for a decomposer that produced nothing usable."""
    m = _LAST_QUESTION.search(clean(problem))
    return clean(m.group(1)) if m else clean(problem)


def solving_loop(
    problem: str,
    *,
    max_steps: int = DEFAULT_MAX_STEPS,
    calculator: bool = True,
    answer_kind: str = "number",
) -> Generator[Event, Reply | None, Solution]:
    """The loop as a generator of events: `Ask` (send back the model's text) and `Solved`
    (send None); it returns the Solution. Each Ask is timed until its text comes back."""
    if max_steps < 1:
        raise ValueError("max_steps must be at least 1")
    timings: dict[str, float] = {}
    counts = {"tokens": 0, "calculator_forced": 0, "calculator_refused": 0, "truncated": 0}
    errors: list[str] = []

    def text_of(reply: Reply | None) -> tuple[str, bool]:
        """The reply's text, and whether the calculator already ran inside its decoding."""
        if not isinstance(reply, Completion):
            return reply or "", False
        if reply.calculator and not calculator:
            raise ValueError(
                "the solver decoded with the calculator but the loop's calculator is off; "
                "pass the same setting to both"
            )
        counts["tokens"] += reply.completion_tokens
        counts["calculator_forced"] += reply.calculator_forced
        counts["calculator_refused"] += reply.calculator_refused
        counts["truncated"] += reply.truncated
        errors.extend(reply.calculator_errors)
        return reply.text, reply.calculator

    t = time.perf_counter()
    text, _ = text_of((yield Ask(DECOMPOSER, decomposer_prompt(problem))))
    timings["decompose_s"] = time.perf_counter() - t
    questions = parse_decomposition(text)[:max_steps]
    fallback = not questions
    if fallback:
        questions = [fallback_question(problem)]
    steps: list[Step] = []
    for k, q in enumerate(questions, 1):
        t = time.perf_counter()
        raw, in_decoding = text_of((yield Ask(SOLVER, solver_prompt(problem, steps, q))))
        timings[f"step{k}_s"] = time.perf_counter() - t
        answer = parse_solver(raw) or "(no answer)"
        if calculator and not in_decoding:  # the fallback, for text that bypassed decoding's
            result = apply_calculator(answer)
            answer = result.text
            errors.extend(result.errors)
            counts["calculator_refused"] += len(result.errors)
        steps.append(Step(q, answer))
        yield Solved(k, steps[-1])
    final = extract_answer(steps[-1].answer, answer_kind)
    timings["total_s"] = sum(timings.values())
    return Solution(problem, final, steps, questions, timings, errors, fallback, **counts)


def solve(problem: str, decompose: Generate, solve_step: Generate, **kw) -> Solution:
    """Run the loop with synchronous batch generate functions (one prompt per call here)."""
    gen = solving_loop(problem, **kw)
    models = {DECOMPOSER: decompose, SOLVER: solve_step}
    reply: Reply | None = None
    try:
        while True:
            event = gen.send(reply)
            reply = models[event.role]([event.prompt])[0] if isinstance(event, Ask) else None
    except StopIteration as done:
        return done.value


async def solve_async(
    problem: str,
    decompose: AsyncGenerate,
    solve_step: AsyncGenerate,
    on_step: Callable[[Solved], Awaitable[None]] | None = None,
    **kw,
) -> Solution:
    """Run the loop with async single-prompt generate calls; `on_step` hears each final step."""
    gen = solving_loop(problem, **kw)
    models = {DECOMPOSER: decompose, SOLVER: solve_step}
    reply: Reply | None = None
    try:
        while True:
            event = gen.send(reply)
            reply = None
            if isinstance(event, Ask):
                reply = await models[event.role](event.prompt)
            elif on_step is not None:
                await on_step(event)
    except StopIteration as done:
        return done.value


def solve_many(
    problems: Sequence[str], decompose: Generate, solve_step: Generate, **kw
) -> list[Solution]:
    """Run the loop for many problems in lockstep: each round sends every pending prompt of a
    role to that role's model as one batch, so batch inference stays full."""
    gens = [solving_loop(p, **kw) for p in problems]
    results: list[Solution | None] = [None] * len(problems)
    pending: dict[int, Ask] = {}

    def advance(i: int, reply: Reply | None) -> None:
        """Send `reply` and skip Solved events until problem i asks again or finishes."""
        try:
            event = gens[i].send(reply)
            while isinstance(event, Solved):
                event = gens[i].send(None)
            pending[i] = event
        except StopIteration as done:
            results[i] = done.value
            pending.pop(i, None)

    for i in range(len(gens)):
        advance(i, None)
    models = {DECOMPOSER: decompose, SOLVER: solve_step}
    while pending:
        for role in (DECOMPOSER, SOLVER):
            ids = [i for i, ask in pending.items() if ask.role == role]
            if not ids:
                continue
            texts = models[role]([pending[i].prompt for i in ids])
            if len(texts) != len(ids):
                raise RuntimeError(f"{role} returned {len(texts)} texts for {len(ids)} prompts")
            for i, text in zip(ids, texts, strict=True):
                advance(i, text)
    return [r for r in results if r is not None]
