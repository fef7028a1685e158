"""The text formats of every student role, and the parsers back.

Training builds its examples here, and the server and the evaluation build their prompts and read
model output here, so a format change can never split them (ARCHITECTURE.md "Student text formats").

Markers (plain ASCII words, no special tokens, so any tokenizer handles them unchanged)::

    Problem: <problem>                  first line of every prompt
    Sub-questions:                      decomposer header
    Steps:                              unified header
    Solution:                           cot header
    Q<k>: <sub-question>                k counts from 1
    A<k>: <sub-answer>
    Answer: <final answer>              last line of cot and answer targets
    Done.                               the iterative decomposer's "no more sub-questions"

The decomposer has two forms (`DECOMPOSER_FORMS`). "all" (the default) writes every sub-question
at once from the problem alone. "iterative" (one question per call) sees the problem and the
steps answered so far and writes the next `Qk:` line, or `Done.` once the problem's question has
been answered::

    Problem: Ann has 3 bags of 4 apples and buys 2 more. How many apples does she have?
    Sub-questions:
    Q1: How many apples are in the bags?
    A1: 3*4 = <<3*4=12>>12
                                        <- target: "Q2: How many apples does she have?"

and after the last answer the target is `Done.`. Why that marker: it is not a `Qk:` line, so no
parser of sub-questions ever reads it as one (a `Qk: [end]` line would be a question to
`parse_decomposition`); and the decision to stop is the reply's first token, not one taken after
the student has already committed to a question number.

Rules that make the formats tokenizer-safe and reversible:

* Every prompt ends with a newline and every target starts with a marker, so the prompt/target
  boundary is always at a line break. Byte-level BPE never merges a newline with the letter after
  it, so tokenising prompt and target apart gives the same tokens as tokenising them together.
  (A prompt ending in "A2: " would not: GPT-2 merges " 24" into one token.)
* Problems, sub-questions and sub-answers are single lines: `clean` collapses every run of
  whitespace (newlines included) into one space. A line break in the text therefore always means a
  new marker, and `parse(build(x)) == clean(x)`.
* A CoT solution keeps its line breaks (one step per line) but loses blank lines and line-edge
  spaces; its final `Answer:` line is the last one, and the parser takes the last such line.
* Sub-answers keep GSM8K calculator annotations (`48/2 = <<48/2=24>>24`): the student learns to
  write them and the solving loop can recompute them (`socratic.calculator`).
* The tokenizer's EOS is not part of these texts; the trainer appends it to every target.

Builders reject empty text with `FormatError`: an empty sub-question is a data error, better
caught when examples are built than learnt by a student. Parsers are lenient instead: model output
is whatever the model wrote, so they take the well-formed prefix and ignore the rest.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from socratic.records import Step

ROLES = ("decomposer", "solver", "unified", "cot", "answer")
DECOMPOSER_FORMS = ("all", "iterative")  # every sub-question at once; one per call (see above)

PROBLEM = "Problem:"
DECOMPOSER_HEADER = "Sub-questions:"
UNIFIED_HEADER = "Steps:"
COT_HEADER = "Solution:"
ANSWER = "Answer:"
# What the loop records for a step the solver left unanswered: never read as an answer (a text
# answer kind would otherwise score the words "no answer").
NO_ANSWER = "(no answer)"
END = "Done."  # the iterative decomposer's last target: no sub-question left to ask

_Q_LINE = re.compile(r"^Q(\d+):\s?(.*)$")
_A_LINE = re.compile(r"^A(\d+):\s?(.*)$")


class FormatError(ValueError):
    """Text that cannot be put into a student format (empty field, unknown role)."""


@dataclass(frozen=True, slots=True)
class Example:
    """One training pair; the loss is on `target` only."""

    prompt: str
    target: str


def clean(text: str) -> str:
    """One line of text in NFC: every whitespace run becomes one space, ends stripped. NFC here,
    where every prompt is built, because Serve normalises a request's text (`serve/validate.py`)
    and a problem must reach the students the same way over HTTP as in training and evaluation
    ("a\u0301" and "\u00e1" are different tokens)."""
    return " ".join(unicodedata.normalize("NFC", str(text)).split())


def _field(text: str, what: str) -> str:
    out = clean(text)
    if not out:
        raise FormatError(f"{what} is empty")
    return out


def _problem_line(problem: str) -> str:
    return f"{PROBLEM} {_field(problem, 'problem')}\n"


def _q(k: int, question: str) -> str:
    return f"Q{k}: {_field(question, f'sub-question {k}')}"


def _a(k: int, answer: str) -> str:
    return f"A{k}: {_field(answer, f'sub-answer {k}')}"


def _history(steps: Sequence[Step]) -> str:
    return "".join(f"{_q(k, s.question)}\n{_a(k, s.answer)}\n" for k, s in enumerate(steps, 1))


def _clean_solution(solution: str) -> str:
    lines = [clean(line) for line in str(solution).splitlines()]
    return "\n".join(line for line in lines if line)


# --- prompts (what serving and evaluation send to a student) ---------------------------------


def decomposer_prompt(problem: str) -> str:
    return _problem_line(problem) + DECOMPOSER_HEADER + "\n"


def decomposer_step_prompt(problem: str, history: Sequence[Step]) -> str:
    """The iterative decomposer's prompt: the problem, then the steps answered so far (as the
    solver sees them); it answers with the next `Qk:` line or `END`. With no history it is
    `decomposer_prompt`: the first call of both forms reads the same text."""
    return decomposer_prompt(problem) + _history(history)


def solver_prompt(problem: str, history: Sequence[Step], question: str) -> str:
    """Problem, the steps answered so far, and the sub-question to answer next."""
    return _problem_line(problem) + _history(history) + _q(len(history) + 1, question) + "\n"


def unified_prompt(problem: str) -> str:
    return _problem_line(problem) + UNIFIED_HEADER + "\n"


def cot_prompt(problem: str) -> str:
    return _problem_line(problem) + COT_HEADER + "\n"


def answer_prompt(problem: str) -> str:
    return _problem_line(problem)


# --- targets (what training teaches a student to write) --------------------------------------


def decomposer_target(questions: Sequence[str]) -> str:
    if not questions:
        raise FormatError("a decomposition needs at least one sub-question")
    return "\n".join(_q(k, q) for k, q in enumerate(questions, 1))


def decomposer_step_target(k: int, question: str | None) -> str:
    """The iterative decomposer's target at step k: sub-question k, or `END` for None."""
    return END if question is None else _q(k, question)


def solver_target(k: int, answer: str) -> str:
    return _a(k, answer)


def unified_target(steps: Sequence[Step]) -> str:
    if not steps:
        raise FormatError("a unified target needs at least one step")
    return _history(steps).rstrip("\n")


def cot_target(solution: str, answer: str) -> str:
    body = _clean_solution(solution)
    final = f"{ANSWER} {_field(answer, 'final answer')}"
    return f"{body}\n{final}" if body else final


def answer_target(answer: str) -> str:
    return f"{ANSWER} {_field(answer, 'final answer')}"


@dataclass(frozen=True, slots=True)
class SolverSequence:
    """All of a problem's solver examples as one text: `problem Q1 A1 Q2 A2 ... Qn An`.

    `pieces` alternate context and target: context 1 is the first example's whole prompt,
    context k > 1 is what lies between target k-1 and target k (`"\nQk: ...\n"`). Joined up to
    target k, the pieces are exactly the k-th per-example prompt (`solver_prompt`), so under
    causal attention every answer sees the context its own example gives it, and a trainer can
    put the loss on every target in one pass instead of re-reading the prompt n times. The
    iterative decomposer packs the same way (`decomposer_sequence`: its targets are the `Qk`
    lines and `END`, its contexts the answers).
    """

    pieces: tuple[str, ...]

    @property
    def contexts(self) -> tuple[str, ...]:
        return self.pieces[0::2]

    @property
    def targets(self) -> tuple[str, ...]:
        return self.pieces[1::2]

    def examples(self) -> list[Example]:
        """The per-example form of the same data (what `examples_for("solver", ...)` gives)."""
        return [
            Example("".join(self.pieces[: 2 * k + 1]), target)
            for k, target in enumerate(self.targets)
        ]


def solver_sequence(problem: str, steps: Sequence[Step]) -> SolverSequence:
    """One problem's solver examples as a single packed sequence (see `SolverSequence`)."""
    if not steps:
        raise FormatError("solver examples need at least one step")
    pieces: list[str] = []
    for k, s in enumerate(steps, 1):
        q = _q(k, s.question) + "\n"
        pieces += [solver_prompt(problem, [], s.question) if k == 1 else "\n" + q]
        pieces.append(solver_target(k, s.answer))
    return SolverSequence(tuple(pieces))


def decomposer_sequence(problem: str, steps: Sequence[Step]) -> SolverSequence:
    """The iterative decomposer's examples of one problem packed as one text, as the solver's
    are (`SolverSequence`): `problem Q1 A1 ... Qn An Done.` with the loss on the `Qk` lines and
    `Done.`, the answers being context. Packed, a problem costs its tokens once instead of n+1
    times, so at a token budget the iterative decomposer sees its data about as often as the
    "all" one does (on `arith`, per-example it would see it ~4x less often)."""
    if not steps:
        raise FormatError("a decomposition needs at least one sub-question")
    pieces: list[str] = [decomposer_prompt(problem)]
    for k, s in enumerate(steps, 1):
        if k > 1:
            pieces.append("\n" + _a(k - 1, steps[k - 2].answer) + "\n")
        pieces.append(decomposer_step_target(k, s.question))
    pieces += ["\n" + _a(len(steps), steps[-1].answer) + "\n", END]
    return SolverSequence(tuple(pieces))


def examples_for(
    role: str,
    *,
    problem: str,
    steps: Sequence[Step] = (),
    solution: str | None = None,
    answer: str | None = None,
    decomposer_form: str = "all",
) -> list[Example]:
    """All training examples one annotated problem gives a role.

    The solver gets one example per sub-question, each with the problem and every earlier step
    in its prompt, which is exactly what it will see inside the solving loop. The decomposer
    gets one example (`decomposer_form` "all") or, "iterative", one per sub-question plus the
    `END` one, each with the steps before it, as the iterative solving loop asks it.
    """
    if role == "decomposer":
        if decomposer_form == "iterative":
            if not steps:
                raise FormatError("a decomposition needs at least one sub-question")
            qs: list[str | None] = [s.question for s in steps]
            prompt = decomposer_step_prompt
            return [
                Example(prompt(problem, steps[:k]), decomposer_step_target(k + 1, q))
                for k, q in enumerate([*qs, None])
            ]
        if decomposer_form != "all":
            raise FormatError(
                f"unknown decomposer form {decomposer_form!r}; forms are "
                + ", ".join(DECOMPOSER_FORMS)
            )
        return [Example(decomposer_prompt(problem), decomposer_target([s.question for s in steps]))]
    if role == "solver":
        if not steps:
            raise FormatError("solver examples need at least one step")
        return [
            Example(solver_prompt(problem, steps[:i], s.question), solver_target(i + 1, s.answer))
            for i, s in enumerate(steps)
        ]
    if role == "unified":
        return [Example(unified_prompt(problem), unified_target(steps))]
    if role == "cot":
        if solution is None:
            raise FormatError("cot examples need a solution")
        return [Example(cot_prompt(problem), cot_target(solution, _require(answer)))]
    if role == "answer":
        return [Example(answer_prompt(problem), answer_target(_require(answer)))]
    raise FormatError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")


def training_examples(
    role: str,
    *,
    problem: str,
    steps: Sequence[Step] = (),
    solution: str | None = None,
    answer: str | None = None,
    decomposer_form: str = "all",
    packed: bool = False,
) -> list[Example | SolverSequence]:
    """What one annotated problem gives a role to train on: with `packed`, the roles whose
    examples share a prefix (the solver, the iterative decomposer) get one packed sequence
    instead of one example per step; everything else is `examples_for`. The one place that
    rule lives, for the trainer (`trainers.data.build_examples`) and the budget planner of
    `pipelines/quality.py` alike."""
    if packed and role == "solver":
        return [solver_sequence(problem, steps)]
    if packed and role == "decomposer" and decomposer_form == "iterative":
        return [decomposer_sequence(problem, steps)]
    return list(
        examples_for(
            role, problem=problem, steps=steps, solution=solution, answer=answer,
            decomposer_form=decomposer_form,
        )
    )  # fmt: skip


def _require(answer: str | None) -> str:
    if answer is None:
        raise FormatError("final answer is missing")
    return answer


# --- parsers (model output back into structure) ----------------------------------------------


def _lines(text: str) -> list[str]:
    return [line.strip() for line in str(text).splitlines() if line.strip()]


def parse_decomposition(text: str) -> list[str]:
    """Sub-questions from decomposer output: the leading run of `Qk:` lines.

    Anything after the first line that is not a sub-question (a model that runs on into an
    answer or a new problem) is ignored rather than read as more sub-questions.
    """
    out = []
    for line in _lines(text):
        m = _Q_LINE.match(line)
        if not m:
            break
        if q := clean(m.group(2)):
            out.append(q)
    return out


def parse_decomposer_step(text: str) -> str | None:
    """The next sub-question from the iterative decomposer: its first line's `Qk:` question
    (k is not checked: the loop numbers the steps itself). None when the reply is `END` or has
    no question on its first line; `decomposer_step_ends` tells the two apart."""
    lines = _lines(text)
    m = _Q_LINE.match(lines[0]) if lines else None
    return (clean(m.group(2)) or None) if m else None


def decomposer_step_ends(text: str) -> bool:
    """Whether the iterative decomposer's reply is the end marker (its first line is `END`)."""
    lines = _lines(text)
    return bool(lines) and lines[0] == END


def parse_solver(text: str) -> str:
    """The sub-answer from solver output: its first line, without an `Ak:` marker."""
    lines = _lines(text)
    if not lines:
        return ""
    m = _A_LINE.match(lines[0])
    return clean(m.group(2) if m else lines[0])


def parse_unified(text: str) -> list[Step]:
    """Steps from unified output: the leading run of `Qk:` / `Ak:` line pairs."""
    lines = _lines(text)
    out = []
    for i in range(0, len(lines) - 1, 2):
        q, a = _Q_LINE.match(lines[i]), _A_LINE.match(lines[i + 1])
        if not (q and a):
            break
        out.append(Step(clean(q.group(2)), clean(a.group(2))))
    return out


def parse_cot(text: str) -> tuple[str, str | None]:
    """(solution, final answer) from cot output; the answer is the last `Answer:` line, if any."""
    lines = _lines(text)
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith(ANSWER):
            return "\n".join(lines[:i]), clean(lines[i][len(ANSWER) :]) or None
    return "\n".join(lines), None


def parse_answer(text: str) -> str | None:
    """The final answer from answer-only output (first line, `Answer:` marker optional)."""
    lines = _lines(text)
    if not lines:
        return None
    first = lines[0]
    if first.startswith(ANSWER):
        first = first[len(ANSWER) :]
    return clean(first) or None
