"""The solving loop: the decomposer asks, the solver answers, the last answer is the answer.

It is written once, without I/O, as a generator that yields `(role, prompt)` and is sent back the
model's text, so that the same loop runs wherever the models are: `solve` drives it with plain
functions (tests, notebooks), `solve_async` with awaitables (the Ray Serve ingress, one request
at a time, streaming each step), and `solve_many` drives many problems in lockstep so each model
sees one batch per step (offline evaluation on Ray Data). None of them can drift from the others.

The loop: decompose the problem into sub-questions (at most `max_steps`); for each, give the
solver the problem, every earlier (sub-question, answer) pair and the next sub-question; the
final answer is read from the last sub-answer with `socratic.answers.extract_answer`.

Two decomposer forms (`socratic.formats.DECOMPOSER_FORMS`): "all" asks the decomposer once for
every sub-question; "iterative" asks it for one sub-question at a time, given the steps answered
so far, alternating with the solver until it writes the end marker (`formats.END`) or
`max_steps` questions were asked. Either form falls back to the problem's own question when the
first reply holds none; a later unusable reply ends the iterative loop like the marker does. A
model dir says its form (`decomposer_form_of`), so evaluation and Serve run the loop it was
trained for without a flag.

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

import json
import re
import time
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from socratic.answers import extract_answer
from socratic.calculator import apply_calculator
from socratic.formats import (
    DECOMPOSER_FORMS,
    NO_ANSWER,
    clean,
    decomposer_prompt,
    decomposer_step_prompt,
    parse_decomposer_step,
    parse_decomposition,
    parse_solver,
    solver_prompt,
)
from socratic.generate import Completion
from socratic.records import Step

DECOMPOSER = "decomposer"
SOLVER = "solver"
DEFAULT_MAX_STEPS = 8
# Written beside an exported student by `trainers/export.py` (its PROVENANCE_FILE; socratic/ does
# not import trainers/): its "decomposer_form" says which loop a decomposer was trained for.
PROVENANCE_FILE = "provenance.json"

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


def decomposer_form_of(model_dir: str | Path) -> str:
    """The form a decomposer was trained in, from its `provenance.json` ("all" when the dir has
    none, e.g. a hub id, a URI or a student exported before forms existed)."""
    f = Path(str(model_dir)) / PROVENANCE_FILE
    if "://" in str(model_dir) or not f.is_file():
        return "all"
    record = json.loads(f.read_text())
    form = record.get("decomposer_form") or (record.get("config") or {}).get("decomposer_form")
    if form not in (None, *DECOMPOSER_FORMS):
        raise ValueError(f"{f}: unknown decomposer_form {form!r}")
    return form or "all"


def solving_loop(
    problem: str,
    *,
    max_steps: int = DEFAULT_MAX_STEPS,
    calculator: bool = True,
    answer_kind: str = "number",
    decomposer_form: str = "all",
) -> Generator[Event, Reply | None, Solution]:
    """The loop as a generator of events: `Ask` (send back the model's text) and `Solved`
    (send None); it returns the Solution. Each Ask is timed until its text comes back.
    `decomposer_form` "iterative" asks the decomposer again before every step (module doc)."""
    if max_steps < 1:
        raise ValueError("max_steps must be at least 1")
    if decomposer_form not in DECOMPOSER_FORMS:
        raise ValueError(f"decomposer_form must be one of {', '.join(DECOMPOSER_FORMS)}")
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

    iterative = decomposer_form == "iterative"
    steps: list[Step] = []
    questions: list[str] = []
    fallback = False
    timings["decompose_s"] = 0.0  # every decomposer call, summed (one, unless iterative)

    def decompose() -> Generator[Event, Reply | None, None]:
        """Ask for the next sub-question(s) and append them to `questions`."""
        nonlocal fallback
        t = time.perf_counter()
        prompt = decomposer_step_prompt(problem, steps) if iterative else decomposer_prompt(problem)
        text, _ = text_of((yield Ask(DECOMPOSER, prompt)))
        timings["decompose_s"] += time.perf_counter() - t
        if iterative:
            q = parse_decomposer_step(text)
            questions.extend([q] if q else [])
        else:
            questions.extend(parse_decomposition(text)[:max_steps])
        if not questions:
            fallback = True
            questions.append(fallback_question(problem))

    yield from decompose()
    k = 0
    while k < len(questions):
        k += 1
        q = questions[k - 1]
        t = time.perf_counter()
        raw, in_decoding = text_of((yield Ask(SOLVER, solver_prompt(problem, steps, q))))
        timings[f"step{k}_s"] = time.perf_counter() - t
        answer = parse_solver(raw) or NO_ANSWER
        if calculator and not in_decoding:  # the fallback, for text that bypassed decoding's
            result = apply_calculator(answer)
            answer = result.text
            errors.extend(result.errors)
            counts["calculator_refused"] += len(result.errors)
        steps.append(Step(q, answer))
        yield Solved(k, steps[-1])
        if iterative and not fallback and k < max_steps:
            yield from decompose()  # the end marker or an unusable reply adds none: the end
    last = steps[-1].answer
    final = None if last == NO_ANSWER else extract_answer(last, answer_kind)
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
