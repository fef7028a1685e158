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
* Extraction prefers explicit markers, then the result of the last calculator annotation, then
  the *last* number. A GSM8K-style step computes its result in an annotation and then often goes
  on with the question's data ("<<18*6=108>>108 kilometers in 6 weeks"), so the annotation is
  what the step computed; on the real GSM8K socratic train set the last step's annotation gives
  the gold answer for 99.9 % of problems where the last number gives it for 97.2 %. Without
  either, worked solutions end with their result, while earlier numbers are the question's data
  or intermediate steps, so the last number is the best guess.
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
    "answers_match",
    "extract_answer",
    "format_answer",
    "normalize_answer",
    "parse_number",
    "strip_calculator_annotations",
]

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
    \$?
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
    (?:(?<![^\s(=:$])-)?
    \$?
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
_ANSWER_MARKER_RE = re.compile(r"\banswer\s*(?:is\b|:)", re.IGNORECASE)
_YESNO_WORD_RE = re.compile(r"\b(yes|no|true|false)\b", re.IGNORECASE)
_YESNO_TEXT_RE = re.compile(r"(yes|no|true|false)[.!?]*", re.IGNORECASE)
_YESNO_CANONICAL = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}

_KINDS = ("number", "yesno", None)


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


def _extract_number(text: str) -> str | None:
    results = [m[1] for m in _ANNOTATION_RESULT_RE.finditer(text)]
    text = strip_calculator_annotations(text).replace(_UNICODE_MINUS, "-")
    for marker in (_GSM8K_MARKER_RE, _ANSWER_MARKER_RE):
        tail = _after_last(marker, text)
        if tail is not None:
            found = _first_number(tail)
            if found is not None:
                return found
    for result in reversed(results):
        number = parse_number(result)
        if number is not None:
            return format_answer(number)
    return _last_number(text)


def _extract_yesno(text: str) -> str | None:
    tail = _after_last(_ANSWER_MARKER_RE, text)
    if tail is not None:
        first = _YESNO_WORD_RE.search(tail)
        if first is not None:
            return _YESNO_CANONICAL[first[1].lower()]
    words = _YESNO_WORD_RE.findall(text)
    return _YESNO_CANONICAL[words[-1].lower()] if words else None


def extract_answer(text: str, kind: str = "number") -> str | None:
    """The final answer in a model's or teacher's free text, normalised, or None if absent.

    Numbers: the first number after a GSM8K ``####``, else the first after the last "answer is"
    / "answer:", else the result of the last ``<<expr=result>>`` annotation, else the last
    number in the text (annotations removed).
    Yes/no: the first yes/no/true/false word after the last "answer is" / "answer:", else the
    last such word anywhere; a marker guards against "The answer is yes. There is no doubt."
    """
    if kind == "number":
        return _extract_number(text)
    if kind == "yesno":
        return _extract_yesno(text)
    raise ValueError(f"unknown answer kind {kind!r}; expected 'number' or 'yesno'")


def answers_match(
    predicted: str | None, gold: str, rel_tol: float = 1e-4, abs_tol: float = 1e-6
) -> bool:
    """Whether a predicted answer counts as the gold one (see the module docstring for why).

    Numbers: two integers must be equal; otherwise ``|p - g| <= max(abs_tol, rel_tol * |g|)``,
    computed exactly. Anything else: equal after ``normalize_answer`` (so "Yes." matches "yes").
    """
    if predicted is None:
        return False
    p, g = parse_number(predicted), parse_number(gold)
    if p is not None and g is not None:
        if p.denominator == 1 and g.denominator == 1:
            return p == g
        bound = max(Fraction(str(abs_tol)), Fraction(str(rel_tol)) * abs(g))
        return abs(p - g) <= bound
    return normalize_answer(predicted) == normalize_answer(gold)
