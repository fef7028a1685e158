"""Final answers: pulling them out of free text, writing them canonically, and comparing them.

The same rules serve two jobs: checking a teacher's worked solution against the gold answer before
it becomes training data, and scoring a student at evaluation time. If those two disagreed about
what "the answer" is, filtered training data and reported accuracy would drift apart, so both go
through this module.

Conventions callers must know:

* Canonical numbers (``format_answer``) are exact: integers as ``"1234"``, terminating fractions
  as plain decimals without trailing zeros or exponents (``"1234.5"``, ``"0.75"``), and everything
  else as a reduced fraction (``"1/3"``). Gold records must not lose information to rounding, so
  nothing is rounded here (the calculator rounds its own output; see ``socratic.calculator``).
* A percent sign is dropped, not divided by 100. GSM8K writes answers such as ``"50%"`` when the
  question asks "what percentage ...", and the gold after ``####`` is ``50``; dividing would turn
  every such correct answer into a mismatch.
* Extraction reads only the text before a run-on: a model that goes on after its answer with a
  new problem ("The answer is 5.\n\nQuestion: ... The answer is 12.") answered 5, so the text is
  cut at the first new-problem line (`Problem:`, `Question:`, `Q:`, a chat turn) after the first
  final-answer marker. Within what is left it prefers `\\boxed{}`, then explicit markers
  (`####`, "Final Answer:", "The answer is", "Answer:", an `A:` line) with the last one winning
  (a self-correction "the answer is 3. Wait, the answer is 4" means 4), then a `**bold**`
  number, then the result of the last calculator annotation, then the *last* number. A
  GSM8K-style step computes its result in an annotation and then often goes on with the
  question's data ("<<18*6=108>>108 kilometers in 6 weeks"), so the annotation is
  what the step computed; on the real GSM8K socratic train set the last step's annotation gives
  the gold answer for 99.9 % of problems where the last number gives it for 97.2 %. Without
  either, worked solutions end with their result, while earlier numbers are the question's data
  or intermediate steps, so the last number is the best guess.
* A text that ends on a marker with nothing after it ("... So, the answer is", a bare
  ``####``) was cut off, or stopped, before its answer: the last number there is a step, not
  the answer. Such a marker is dropped; an answer stated at an earlier marker still counts
  ("The answer is 3. Checking: ... the answer is" means 3), and without one there is no
  answer (None), not a guess. Real small-model output cut by a token limit ends this way.
* Currency signs ($, €, £, ¥) and thousands separators are dropped; LaTeX inside ``\\boxed{}``
  (``\\frac{a}{b}``, ``1{,}000``, ``\\text{...}``, ``\\$``) is read as the number it writes.
* A ``-`` is a minus sign only at the start of the text or after whitespace, ``(``, ``=``, ``:``
  or ``$``; elsewhere it is subtraction, so ``"10-3 = 7"`` ends in ``7``, never in ``-3``.
* A period after a number is a decimal point only when digits follow it: "It costs 72." is 72.
* ``answers_match`` compares two integers exactly. Otherwise numbers match when
  ``|p - g| <= max(abs_tol, rel_tol * |g|)``, computed exactly with fractions (the boundary is
  inclusive). The tolerance exists for rounded renderings of non-terminating values: with the
  default ``rel_tol=1e-4``, ``"0.33333"`` and even ``"0.3333"`` (exactly on the boundary) match
  ``"1/3"``, ``"0.3332"`` does not. Integers are exempt because no rounding can explain an
  integer that is off by one: a relative tolerance would otherwise accept 15001 for 15000.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

__all__ = [
    "ANSWER_KINDS",
    "answers_match",
    "extract_answer",
    "format_answer",
    "normalize_answer",
    "normalize_text",
    "parse_number",
    "strip_calculator_annotations",
]

# What a dataset's answers are: a number, yes/no, a choice letter, or a short text.
ANSWER_KINDS = ("number", "yesno", "choice", "text")

_UNICODE_MINUS = "\u2212"

# Degenerate generations can emit thousands of digits; Python refuses to convert integers of
# more than 4300 digits, and no real answer comes close, so such runs are not numbers here.
_MAX_DIGITS = 1000

_ANNOTATION_RE = re.compile(r"<<[^<>]*>>")
_ANNOTATION_RESULT_RE = re.compile(r"<<[^<>=]*=([^<>=]*)>>")

# One number as people write it, whole string. Thousands separators must be proper groups of
# three, so "1,23" is not a number (it is more likely a list than a typo of 123).
_NUMBER_RE = re.compile(
    r"""
    (?P<sign1>[+-])?
    [$€£¥]?
    (?P<sign2>[+-])?
    (?P<int>\d{1,3}(?:,\d{3})+|\d+)?
    (?:\.(?P<frac>\d+))?
    (?:/(?P<den>\d+))?
    %?
    \.?
    """,
    re.VERBOSE,
)

# A number inside running text. The sign is only taken where it cannot be subtraction; the
# decimal part needs a digit after the point, so a sentence-final period is left alone.
_TOKEN_RE = re.compile(
    r"""
    (?:(?<![^\s(=:$€£¥*{])-)?
    [$€£¥]?
    (?:
        (?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?
      | \.\d+
    )
    (?:/\d+)?
    %?
    """,
    re.VERBOSE,
)

_GSM8K_MARKER_RE = re.compile(r"####")
# "answer is", "answer:", "Final Answer:", "answer is:", and an `A:` line (not `A1:`, a step).
_ANSWER_MARKER_RE = re.compile(
    r"\banswer\s*(?:is\b\s*:?|:)|(?:^|\n)[ \t]*A[ \t]*:", re.IGNORECASE
)
_FINAL_MARKER_RE = re.compile(_GSM8K_MARKER_RE.pattern + "|" + _ANSWER_MARKER_RE.pattern, re.I)
# Where a run-on begins: a new problem or chat turn on a line of its own.
_RUN_ON_RE = re.compile(
    r"\n[ \t]*(?:#+[ \t]*)?(?:problem|question|q|human|user|instruction)[ \t]*\d*[ \t]*:"
    r"|<\|(?:im_start|user|endoftext|eot_id)\|>",
    re.IGNORECASE,
)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOLD_RE = re.compile(r"\*\*([^*\n]{1,40})\*\*")
_CHOICE_RE = re.compile(r"(?<![A-Za-z])\(?([A-Ja-j])\)(?![A-Za-z])|^\s*([A-Ja-j])\s*[.:)]?\s*$")
_CHOICE_AFTER_MARKER_RE = re.compile(
    r"^[\s:*(\[]*(?:option|choice)?\s*\(?([A-Ja-j])\b(?![''’][a-z])"
)
_YESNO_WORD_RE = re.compile(r"\b(yes|no|true|false)\b", re.IGNORECASE)
_YESNO_TEXT_RE = re.compile(r"(yes|no|true|false)[.!?]*", re.IGNORECASE)
_YESNO_CANONICAL = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}

_KINDS = (*ANSWER_KINDS, None)


def strip_calculator_annotations(text: str) -> str:
    """Remove ``<<expr=result>>`` spans so the numbers inside them are not mistaken for answers.

    GSM8K solutions repeat each result right after its annotation ("48/2 = <<48/2=24>>24"), so
    dropping the span loses nothing a reader would see.
    """
    return _ANNOTATION_RE.sub("", text)


def parse_number(text: str) -> Fraction | None:
    """Read one number token the way a person wrote it, or return None if it is not one.

    Accepts signs (including the unicode minus), a ``$`` prefix, thousands separators, decimals
    with or without digits before the point, ``a/b`` fractions, a trailing ``%`` (dropped, not
    divided by 100) and a trailing sentence period. Space-grouped digits ("1 234") and runs of
    more than 1000 digits are rejected.
    """
    stripped = text.strip().replace(_UNICODE_MINUS, "-")
    match = _NUMBER_RE.fullmatch(stripped)
    if match is None:
        return None
    if match["sign1"] and match["sign2"]:
        return None
    int_part, frac_part, den = match["int"], match["frac"], match["den"]
    if int_part is None and frac_part is None:
        return None
    if sum(map(len, (int_part or "", frac_part or "", den or ""))) > _MAX_DIGITS:
        return None
    if den is not None and int(den) == 0:
        return None
    value = Fraction(int((int_part or "0").replace(",", "")))
    if frac_part is not None:
        value += Fraction(int(frac_part), 10 ** len(frac_part))
    if den is not None:
        value /= int(den)
    return -value if "-" in (match["sign1"], match["sign2"]) else value


def _terminating_scale(denominator: int) -> int | None:
    """Digits after the point needed to write 1/denominator exactly, or None if it never ends."""
    twos = fives = 0
    while denominator % 2 == 0:
        denominator //= 2
        twos += 1
    while denominator % 5 == 0:
        denominator //= 5
        fives += 1
    return max(twos, fives) if denominator == 1 else None


def format_answer(x: Fraction) -> str:
    """Write a number canonically and exactly, so equal values always produce equal text.

    Terminating values become plain decimals; others stay as a reduced ``a/b`` because any
    decimal rendering would have to round.
    """
    x = Fraction(x)
    if x.denominator == 1:
        return str(x.numerator)
    scale = _terminating_scale(x.denominator)
    sign = "-" if x < 0 else ""
    if scale is None:
        return f"{sign}{abs(x.numerator)}/{x.denominator}"
    digits = str(abs(x.numerator) * 10**scale // x.denominator).rjust(scale + 1, "0")
    return f"{sign}{digits[:-scale]}.{digits[-scale:].rstrip('0')}"


def _check_kind(kind: str | None) -> None:
    if kind not in _KINDS:
        raise ValueError(f"unknown answer kind {kind!r}; expected 'number', 'yesno' or None")


def normalize_answer(value: str | int | float | bool, kind: str | None = None) -> str:
    """The canonical text of a gold answer, so records from different datasets compare equal.

    ``kind`` states what the dataset promises: ``"number"`` and ``"yesno"`` raise ValueError
    when the value is not of that kind (a gold record that breaks its promise is a data bug, not
    something to guess around); ``None`` accepts anything and falls back to the stripped text.
    """
    _check_kind(kind)
    if kind == "choice":
        letter = str(value).strip().strip("().").upper()
        if not re.fullmatch(r"[A-J]", letter):
            raise ValueError(f"expected a choice letter (A-J) as the answer, got {value!r}")
        return letter
    if kind == "text":
        if isinstance(value, bool) or not str(value).strip():
            raise ValueError(f"expected a short text as the answer, got {value!r}")
        return " ".join(str(value).split())
    if isinstance(value, bool):
        if kind == "number":
            raise ValueError(f"expected a number as the answer, got the boolean {value!r}")
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if kind == "yesno":
            raise ValueError(f"expected a yes/no answer, got the number {value!r}")
        if isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError(f"expected a finite number as the answer, got {value!r}")
            # str() first so that 0.1 means one tenth, not the binary float nearest to it.
            return format_answer(Fraction(str(value)))
        return format_answer(Fraction(value))
    if not isinstance(value, str):
        raise TypeError(f"answer must be str, int, float or bool, not {type(value).__name__}")

    text = value.strip()
    if kind != "number":
        yesno = _YESNO_TEXT_RE.fullmatch(text)
        if yesno is not None:
            return _YESNO_CANONICAL[yesno[1].lower()]
        if kind == "yesno":
            raise ValueError(f"expected a yes/no answer, got {value!r}")
    number = parse_number(text)
    if number is not None:
        return format_answer(number)
    if kind == "number":
        raise ValueError(f"expected a number as the answer, got {value!r}")
    return text


def _first_number(text: str) -> str | None:
    for token in _TOKEN_RE.finditer(text):
        number = parse_number(token[0])
        if number is not None:
            return format_answer(number)
    return None


def _last_number(text: str) -> str | None:
    for token in reversed(list(_TOKEN_RE.finditer(text))):
        number = parse_number(token[0])
        if number is not None:
            return format_answer(number)
    return None


def _after_last(marker: re.Pattern[str], text: str) -> str | None:
    matches = list(marker.finditer(text))
    return text[matches[-1].end() :] if matches else None


def _drop_unfinished_marker(text: str) -> tuple[str, bool]:
    """`text` without the final-answer marker it ends on, if it ends on one with no letter or
    digit after it ("So, the answer is", cut off by a length limit), and whether it did."""
    matches = list(_FINAL_MARKER_RE.finditer(text))
    if matches and not any(c.isalnum() for c in text[matches[-1].end() :]):
        return text[: matches[-1].start()], True
    return text, False


def _before_run_on(text: str) -> str:
    """`text` up to the first new-problem line that follows its first final-answer marker."""
    first = _FINAL_MARKER_RE.search(text) or _BOXED_RE.search(text)
    if first is None:
        return text
    run_on = _RUN_ON_RE.search(text, first.end())
    return text[: run_on.start()] if run_on else text


def _boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (braces balanced), as plain text."""
    starts = list(_BOXED_RE.finditer(text))
    if not starts:
        return None
    i = starts[-1].end()
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    if depth:
        return None
    inner = text[i : j - 1]
    inner = re.sub(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"(\1)/(\2)", inner)
    inner = re.sub(r"\\text\s*\{([^{}]*)\}", r"\1", inner)
    inner = inner.replace("{,}", ",").replace("\\$", "$").replace("\\%", "%")
    inner = re.sub(r"\\[,!;: ]", "", inner)
    frac = re.fullmatch(r"\s*(-?)\((\d+)\)/\((\d+)\)\s*", inner)
    if frac:
        return f"{frac[1]}{frac[2]}/{frac[3]}"
    return inner.replace("(", "").replace(")", "").strip()


def _extract_number(text: str) -> str | None:
    text = _before_run_on(text.replace(_UNICODE_MINUS, "-"))
    boxed = _boxed(text)
    if boxed is not None and (found := _first_number(boxed)) is not None:
        return found
    results = [m[1] for m in _ANNOTATION_RESULT_RE.finditer(text)]
    text, unfinished = _drop_unfinished_marker(strip_calculator_annotations(text))
    for marker in (_GSM8K_MARKER_RE, _ANSWER_MARKER_RE):
        tail = _after_last(marker, text)
        if tail is not None:
            found = _first_number(tail)
            if found is not None:
                return found
    if unfinished:
        return None
    for bold in reversed(_BOLD_RE.findall(text)):
        if (number := parse_number(bold.strip())) is not None:
            return format_answer(number)
    for result in reversed(results):
        number = parse_number(result)
        if number is not None:
            return format_answer(number)
    return _last_number(text)


def _extract_yesno(text: str) -> str | None:
    text = _before_run_on(text)
    boxed = _boxed(text)
    if boxed is not None and (first := _YESNO_WORD_RE.search(boxed)) is not None:
        return _YESNO_CANONICAL[first[1].lower()]
    text, unfinished = _drop_unfinished_marker(text)
    tail = _after_last(_ANSWER_MARKER_RE, text)
    if tail is not None:
        first = _YESNO_WORD_RE.search(tail)
        if first is not None:
            return _YESNO_CANONICAL[first[1].lower()]
    if unfinished:
        return None
    words = _YESNO_WORD_RE.findall(text)
    return _YESNO_CANONICAL[words[-1].lower()] if words else None


def _extract_choice(text: str) -> str | None:
    """A choice letter: in `\\boxed{}`, after the last answer marker ("Answer: (B)", "the
    answer is option c"), bold, or written as "(B)" / "B)" / alone; upper case."""
    text = _before_run_on(text)
    boxed = _boxed(text)
    if boxed is not None and (m := _CHOICE_AFTER_MARKER_RE.match(boxed)):
        return m[1].upper()
    text, unfinished = _drop_unfinished_marker(text)
    tail = _after_last(_ANSWER_MARKER_RE, text)
    if tail is not None and (m := _CHOICE_AFTER_MARKER_RE.match(tail)):
        return m[1].upper()
    if unfinished:
        return None
    for bold in reversed(_BOLD_RE.findall(text)):
        if m := _CHOICE_AFTER_MARKER_RE.match(bold):
            return m[1].upper()
    found = [a or b for a, b in _CHOICE_RE.findall(text)]
    return found[-1].upper() if found else None


_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION_RE = re.compile(r"[^\w\s]")


def normalize_text(text: str) -> str:
    """A short text answer for comparison (SQuAD's rule): lower case, no punctuation, no
    articles, one space between words."""
    text = _PUNCTUATION_RE.sub(" ", text.lower())
    return " ".join(_ARTICLES_RE.sub(" ", text).split())


def _extract_text(text: str) -> str | None:
    """A short text answer: in `\\boxed{}`, else after the last answer marker, else the first
    line; up to the end of its sentence or line."""
    text = _before_run_on(text)
    source = _boxed(text)
    text, unfinished = _drop_unfinished_marker(text)
    if source is None:
        source = _after_last(_ANSWER_MARKER_RE, text)
    if source is None:
        if unfinished:
            return None
        source = text
    line = source.strip().split("\n", 1)[0]
    line = re.split(r"(?<=[^\s.])\.(?:\s|$)", line, maxsplit=1)[0]
    line = line.strip().strip("*").strip()
    return line or None


def extract_answer(text: str, kind: str = "number") -> str | None:
    """The final answer in a model's or teacher's free text, normalised, or None if absent.

    Read before any run-on (see the module docstring). Numbers: the number in the last
    `\\boxed{}`, else the first number after a GSM8K ``####``, else the first after the last
    "answer is" / "answer:" / "Final Answer:" / `A:` line, else the last bold number, else the
    result of the last ``<<expr=result>>`` annotation, else the last number (annotations
    removed). A text that ends on a marker with nothing after it was cut off before its answer:
    an earlier marker's answer still counts, else None (no fallback). Yes/no: the first
    yes/no/true/false word in `\\boxed{}` or after the last marker, else the last such word
    anywhere; a marker guards against "The answer is yes. There is no doubt." Choice: an
    upper-case letter. Text: the answer's sentence as written (compare with `normalize_text`).
    """
    if kind == "number":
        return _extract_number(text)
    if kind == "yesno":
        return _extract_yesno(text)
    if kind == "choice":
        return _extract_choice(text)
    if kind == "text":
        return _extract_text(text)
    raise ValueError(f"unknown answer kind {kind!r}; expected one of {', '.join(ANSWER_KINDS)}")


def answers_match(
    predicted: str | None,
    gold: str,
    rel_tol: float = 1e-4,
    abs_tol: float = 1e-6,
    kind: str | None = None,
) -> bool:
    """Whether a predicted answer counts as the gold one (see the module docstring for why).

    Numbers: two integers must be equal; otherwise ``|p - g| <= max(abs_tol, rel_tol * |g|)``,
    computed exactly. Text (`kind="text"`): equal after `normalize_text`. Anything else: equal
    after ``normalize_answer`` (so "Yes." matches "yes", "b" matches "B" for choices).
    """
    if predicted is None:
        return False
    if kind == "text":
        return normalize_text(predicted) == normalize_text(gold)
    if kind == "choice":
        return predicted.strip().strip("()").upper() == gold.strip().strip("()").upper()
    p, g = parse_number(predicted), parse_number(gold)
    if p is not None and g is not None:
        if p.denominator == 1 and g.denominator == 1:
            return p == g
        bound = max(Fraction(str(abs_tol)), Fraction(str(rel_tol)) * abs(g))
        return abs(p - g) <= bound
    return normalize_answer(predicted) == normalize_answer(gold)
