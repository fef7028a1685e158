"""What we ask the teacher and how we judge its reply: prompts, cache keys, the judge.

Pure functions over `socratic` records, no network: the client that sends these prompts is
`pipelines/teacher_client.py`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from socratic.answers import answers_match, extract_answer, parse_number
from socratic.calculator import CalculatorError, apply_calculator, evaluate
from socratic.formats import clean, parse_cot, parse_unified
from socratic.records import ACCEPTED, REJECTED, Problem, Step

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
STYLES = ("socratic", "cot")
# The bundled prompt file family per answer kind: `<style>_<family>.yaml`.
PROMPT_FAMILIES = {"number": "math", "yesno": "yesno", "choice": "choice", "text": "text"}

# Reasons a rejected row can carry. `api_error: <kind>: ...` rows whose kind is transient are
# retried by the next run into the same output; every other rejection is final.
WRONG_ANSWER = "wrong_answer"
UNPARSEABLE = "unparseable"
EMPTY_RESPONSE = "empty_response"
NO_GOLD_STEPS = "no_gold_steps"
TRANSIENT_KINDS = ("429", "500", "502", "503", "504", "408", "409", "timeout", "connection")


def is_transient(reason: str | None) -> bool:
    """Whether a rejected row's reason says "try again later" rather than "this is the answer"."""
    if not reason or not reason.startswith("api_error: "):
        return False
    kind = reason[len("api_error: ") :].split(":", 1)[0].strip()
    return kind in TRANSIENT_KINDS or kind.startswith("5")


# --- prompts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """A versioned few-shot prompt, read from a YAML file a user can read and override."""

    version: str
    style: str
    system: str
    user: str
    with_solution: str
    examples: tuple[Mapping[str, str], ...]

    @classmethod
    def load(cls, path: str | Path) -> Prompt:
        p = Path(path)
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
        missing = [k for k in ("version", "style", "system", "user") if not data.get(k)]
        if missing:
            raise ValueError(f"{p}: prompt file lacks {', '.join(missing)}")
        if data["style"] not in STYLES:
            raise ValueError(f"{p}: style must be one of {STYLES}, got {data['style']!r}")
        examples = tuple(data.get("examples") or ())
        for i, ex in enumerate(examples, 1):
            if not ex.get("question") or not ex.get("response"):
                raise ValueError(f"{p}: example {i} needs a question and a response")
        return cls(
            version=str(data["version"]),
            style=data["style"],
            system=data["system"].strip(),
            user=data["user"],
            with_solution=data.get("with_solution") or "",
            examples=examples,
        )

    @classmethod
    def default(cls, style: str, answer_kind: str) -> Prompt:
        """The bundled prompt for a style and answer kind: each kind's prompt asks for its
        final answer in the form the judge reads (a number, yes/no, a letter, a short text)."""
        if answer_kind not in PROMPT_FAMILIES:
            raise ValueError(
                f"no bundled prompt for answer kind {answer_kind!r}; "
                f"known: {', '.join(PROMPT_FAMILIES)}"
            )
        return cls.load(PROMPTS_DIR / f"{style}_{PROMPT_FAMILIES[answer_kind]}.yaml")

    def _user(self, question: str, solution: str | None) -> str:
        text = self.user.format(question=clean(question))
        if solution and self.with_solution:
            text += "\n" + self.with_solution.format(solution=solution.strip()).rstrip()
        return text

    def messages(self, problem: Problem, with_solution: bool) -> list[dict[str, str]]:
        """Chat messages: system, the few-shot turns, then the problem (and its gold solution)."""
        out = [{"role": "system", "content": self.system}]
        for ex in self.examples:
            sol = ex.get("solution") if with_solution else None
            out.append({"role": "user", "content": self._user(ex["question"], sol)})
            out.append({"role": "assistant", "content": ex["response"].strip()})
        sol = problem.solution if with_solution else None
        out.append({"role": "user", "content": self._user(problem.question, sol)})
        return out


def cache_key(
    *,
    model: str,
    messages: Sequence[Mapping[str, str]],
    sampling: Mapping[str, Any],
    prompt_version: str,
    problem_id: str,
    sample: int,
) -> str:
    """Identity of one teacher call: everything that shapes its answer, hashed.

    Keyed this loosely and no looser: a changed prompt, model or temperature makes new calls
    instead of serving stale answers from an earlier run into the same output.
    """
    blob = json.dumps(
        {
            "model": model,
            "messages": list(messages),
            "sampling": dict(sampling),
            "prompt_version": prompt_version,
            "problem_id": problem_id,
            "sample": sample,
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


# --- judging a reply ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    steps: tuple[Step, ...]
    predicted: str | None
    status: str
    reason: str | None


def judge(problem: Problem, text: str, style: str) -> Verdict:
    """Parse a teacher reply and check its final answer against gold.

    The final answer is read from the last step (Socratic) or the `Answer:` line (CoT) and
    compared for the problem's answer kind with the same rules evaluation uses (a choice letter
    as a letter, a short text after normalisation), so what we keep as "correct" is what we
    would score as correct.
    """
    if not text.strip():
        return Verdict((), None, REJECTED, EMPTY_RESPONSE)
    kind = problem.answer_kind
    if style == "socratic":
        steps = tuple(parse_unified(text))
        if not steps:
            return Verdict((), None, REJECTED, UNPARSEABLE)
        predicted = extract_answer(steps[-1].answer, kind)
    else:
        steps = ()
        _, final = parse_cot(text)
        if final is None:
            return Verdict((), None, REJECTED, UNPARSEABLE)
        predicted = extract_answer(final, kind)
    if predicted is None:
        return Verdict(steps, None, REJECTED, UNPARSEABLE)
    ok = answers_match(predicted, problem.answer, kind=kind)
    return Verdict(steps, predicted, ACCEPTED if ok else REJECTED, None if ok else WRONG_ANSWER)


# --- per-step checks ---------------------------------------------------------------------------

WRONG_STEP = "wrong_step"
STEP_CHECKS = ("reject", "repair", "off")
_SPAN = re.compile(r"<<([^<>=]+)=([^<>]*)>>")


def check_steps(steps: Sequence[Step]) -> tuple[int, tuple[Step, ...]]:
    """(number of `<<expr=value>>` spans whose value is wrong, the steps with them recomputed).

    Only the final answer is compared with gold, so a reply can reach it through a wrong
    intermediate result; the student would then learn that step. The calculator is the same one
    that runs inside decoding, so a repaired value is what the student will be forced to write.
    A span the calculator refuses (not arithmetic) is left alone, not counted as wrong.
    """
    wrong = 0
    out = []
    for step in steps:
        bad = 0
        for m in _SPAN.finditer(step.answer):
            try:
                value = evaluate(m[1])
            except CalculatorError:
                continue
            claimed = parse_number(m[2])
            if claimed is None or claimed != value:
                bad += 1
        wrong += bad
        out.append(Step(step.question, apply_calculator(step.answer).text) if bad else step)
    return wrong, tuple(out)


def decomposition_id(steps: Sequence[Step]) -> str | None:
    """Identity of a decomposition (its sub-questions): K samples sharing it are one answer."""
    if not steps:
        return None
    text = "\n".join(" ".join(s.question.lower().split()) for s in steps)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
