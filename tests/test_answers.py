"""Tests for answer parsing, canonical formatting, extraction from free text, and matching."""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from socratic.answers import (
    answers_match,
    extract_answer,
    format_answer,
    normalize_answer,
    parse_number,
    strip_calculator_annotations,
)
from socratic.calculator import apply_calculator

# --- strip_calculator_annotations ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("48/2 = <<48/2=24>>24", "48/2 = 24"),
        ("a <<1+1=2>>2 and $<<0.2*50=10>>10.", "a 2 and $10."),
        ("no annotations", "no annotations"),
        ("", ""),
    ],
)
def test_strip_calculator_annotations(text: str, expected: str) -> None:
    assert strip_calculator_annotations(text) == expected


# --- parse_number -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,234", Fraction(1234)),
        ("$1,234.50", Fraction(246_9, 2)),
        ("-3", Fraction(-3)),
        ("\u22123", Fraction(-3)),
        ("50%", Fraction(50)),
        ("3/4", Fraction(3, 4)),
        ("-1/2", Fraction(-1, 2)),
        ("12.", Fraction(12)),
        ("72.", Fraction(72)),
        (".5", Fraction(1, 2)),
        ("+7", Fraction(7)),
        ("-$5", Fraction(-5)),
        ("$-5", Fraction(-5)),
        (" 42 ", Fraction(42)),
        ("0.1", Fraction(1, 10)),
        ("1,000,000", Fraction(10**6)),
        ("-0", Fraction(0)),
        ("007", Fraction(7)),
        ("12.50%", Fraction(25, 2)),
    ],
)
def test_parse_number(text: str, expected: Fraction) -> None:
    assert parse_number(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "1 234",
        "abc",
        "",
        "   ",
        "1,23",
        "1,2345",
        "3/0",
        "--3",
        "+-3",
        ".",
        "$",
        "%",
        "1.2.3",
        "five",
        "12 apples",
        "1e5",
        "9" * 1001,
    ],
)
def test_parse_number_rejects(text: str) -> None:
    assert parse_number(text) is None


# --- format_answer ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Fraction(1234), "1234"),
        (Fraction(2469, 2), "1234.5"),
        (Fraction(3, 4), "0.75"),
        (Fraction(-3), "-3"),
        (Fraction(0), "0"),
        (Fraction(-5, 2), "-2.5"),
        (Fraction(1, 20), "0.05"),
        (Fraction(1, 1024), "0.0009765625"),
        (Fraction(1, 3), "1/3"),
        (Fraction(-1, 3), "-1/3"),
        (Fraction(7, 6), "7/6"),
        (Fraction(10**20), "100000000000000000000"),
    ],
)
def test_format_answer(value: Fraction, text: str) -> None:
    assert format_answer(value) == text


_terminating = st.builds(
    lambda n, a, b: Fraction(n, 2**a * 5**b),
    st.integers(-(10**15), 10**15),
    st.integers(0, 12),
    st.integers(0, 12),
)


@given(st.one_of(_terminating, st.integers(-(10**20), 10**20).map(Fraction)))
def test_format_answer_round_trips_terminating(x: Fraction) -> None:
    text = format_answer(x)
    assert "/" not in text and "e" not in text
    assert not (("." in text) and text.endswith("0"))
    assert parse_number(text) == x


@given(st.fractions())
def test_format_answer_round_trips_any_fraction(x: Fraction) -> None:
    assert parse_number(format_answer(x)) == x


# --- normalize_answer ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "kind", "expected"),
    [
        (True, None, "yes"),
        (False, None, "no"),
        (False, "yesno", "no"),
        (51.0, None, "51"),
        (51.0, "number", "51"),
        (0.1, None, "0.1"),
        (1e-7, None, "0.0000001"),
        (-0.0, None, "0"),
        (72, "number", "72"),
        ("Yes", None, "yes"),
        ("yes.", None, "yes"),
        ("TRUE", None, "yes"),
        ("false", None, "no"),
        ("No!", "yesno", "no"),
        (" no ", "yesno", "no"),
        ("1,200", "number", "1200"),
        (" 72 ", None, "72"),
        ("$5.50", None, "5.5"),
        ("50%", "number", "50"),
        ("1/3", "number", "1/3"),
        ("2/4", "number", "0.5"),
        ("Paris ", None, "Paris"),
        ("yes sir", None, "yes sir"),
    ],
)
def test_normalize_answer(value: object, kind: str | None, expected: str) -> None:
    assert normalize_answer(value, kind) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "kind", "fragment"),
    [
        ("Paris", "number", "expected a number"),
        ("yes", "number", "expected a number"),
        ("", "number", "expected a number"),
        (True, "number", "expected a number"),
        ("maybe", "yesno", "expected a yes/no"),
        (3, "yesno", "expected a yes/no"),
        (float("nan"), None, "finite"),
        (float("inf"), "number", "finite"),
        ("5", "bogus", "unknown answer kind"),
    ],
)
def test_normalize_answer_rejects(value: object, kind: str | None, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        normalize_answer(value, kind)  # type: ignore[arg-type]


@given(
    st.one_of(
        st.text(),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.booleans(),
        st.fractions().map(format_answer),
        st.sampled_from(["Yes.", "NO", "true", " False!", "$1,234.50", "50%", "-1/2", "72."]),
    )
)
def test_normalize_answer_is_idempotent(value: str | int | float | bool) -> None:
    once = normalize_answer(value)
    assert normalize_answer(once) == once


# --- extract_answer -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$1,234.50", "1234.5"),
        ("-3", "-3"),
        ("50%", "50"),
        ("3/4", "0.75"),
        ("1/3", "1/3"),
        ("The answer is 72.", "72"),
        ("#### 1,200", "1200"),
        ("10-3 = 7", "7"),
        ("5-3", "3"),
        ("It is -4 degrees.", "-4"),
        ("It was (-4) degrees.", "-4"),
        ("x = \u22125", "-5"),
        ("Answer: 12.50 dollars", "12.5"),
        ("answer: 3", "3"),
        ("Natalia sold 48/2 = <<48/2=24>>24 clips", "24"),
        # The last annotation's result beats the last number: a step goes on after its result.
        ("He runs 18*6 = <<18*6=108>>108 kilometers in 6 weeks.", "108"),
        ("So 3+4 = <<3+4=7>>7 and then <<7*2=14>>14 in 2 days", "14"),
        ("<<2+2=4>>4 apples; the answer is 5", "5"),
        ("It costs 72.", "72"),
        ("The answer is: $3,000.", "3000"),
        ("The answer is 5 apples, not 6.", "5"),
        ("answer: 7, so #### 8", "8"),
        ("First answer is 3. Wait, the answer is 4. Check: 4 + 0 = 4, 10 more", "4"),
        ("The answer is unknown, but we computed 9", "9"),
        ("Multiply 3 by 4 to get 12", "12"),
        ("The price rose 25%.", "25"),
        ("He paid $.50", "0.5"),
        ("Total: 1,000,000 people", "1000000"),
        ("no numbers at all", None),
        ("", None),
        ("####", None),
    ],
)
def test_extract_number(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes.", "yes"),
        ("NO", "no"),
        ("true", "yes"),
        ("False!", "no"),
        ("So the answer is no.", "no"),
        ("The answer is yes. There is no doubt.", "yes"),
        ("Paris is in France, so yes", "yes"),
        ("Nobody knows, yesterday was odd", None),
        ("I can't tell.", None),
        ("", None),
    ],
)
def test_extract_yesno(text: str, expected: str | None) -> None:
    assert extract_answer(text, kind="yesno") == expected


def test_extract_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown answer kind"):
        extract_answer("5", kind="date")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # what teachers and chat models write
        ("So the total is $\\boxed{72}$.", "72"),
        ("\\boxed{\\frac{3}{4}}", "0.75"),
        ("\\boxed{-\\dfrac{1}{3}}", "-1/3"),
        ("Thus \\boxed{1{,}200} cookies", "1200"),
        ("\\boxed{\\$18}", "18"),
        ("\\boxed{45\\text{ minutes}} and 3 more", "45"),
        ("Final Answer: The final answer is 42. I hope it is correct.", "42"),
        ("**Final Answer:** 17", "17"),
        ("She has 3 + 4 = 7 apples.\nA: 7", "7"),
        ("A1: 3 + 4 = 7\nA2: 7 * 2 = 14", "14"),  # A1:/A2: are steps, not an A: line
        ("She pays **$1,250** in all.", "1250"),
        ("It costs €12.50.", "12.5"),
        ("It costs £3,000 now", "3000"),
        ("The answer is −8 degrees.", "-8"),
        ("The answer is 12.5%", "12.5"),
        ("The answer is 2/3 of a cup.", "2/3"),
        # run-on: the model answered, then went on with a problem it made up
        ("3 + 4 = 7. The answer is 7.\n\nQuestion: Tom has 5 pens. The answer is 12.", "7"),
        ("#### 7\nProblem: A box holds 9. How many?\n#### 9", "7"),
        ("Answer: 7<|endoftext|>Answer: 9", "7"),
        ("The answer is 7.\nQ: How many legs? A: 8", "7"),
        # a self-correction before any run-on still takes the last marker
        ("The answer is 3. Wait, that is wrong: the answer is 4.", "4"),
    ],
)
def test_extract_number_from_real_world_shapes(text: str, expected: str) -> None:
    assert extract_answer(text) == expected


# Real small-model output cut off by its token limit (tests/data/extraction_corpus.jsonl,
# gsm8k/test/35) ends on the marker: no answer was stated, whatever number came before it.
@pytest.mark.parametrize(
    ("text", "kind", "expected"),
    [
        ("This gives us 40 * 2 = 80 points.\n\nSo, the answer is ", "number", None),
        ("He has 3 + 4 = 7 apples.\n####", "number", None),
        ("So 12 + 5 = 17. Final Answer:**", "number", None),
        # an answer stated at an earlier marker still counts
        ("The answer is 3. Checking: 3 * 2 = 6, so the answer is", "number", "3"),
        ("#### 33\nThe answer is", "number", "33"),
        ("There is no doubt about it. So the answer is", "yesno", None),
        ("Answer: yes. To check once more, the answer is:", "yesno", "yes"),
        ("Both (B) and (C) fit, so the answer is", "choice", None),
        ("The answer is (B). Checking again, the answer is", "choice", "B"),
        ("Paris is in France. The answer is", "text", None),
        ("The answer is Paris. In short, the answer is", "text", "Paris"),
    ],
)
def test_extract_text_that_ends_on_a_marker(text: str, kind: str, expected: str | None) -> None:
    assert extract_answer(text, kind=kind) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\boxed{No}", "no"),
        ("**Yes**, because Paris is in France.", "yes"),
        ("Final Answer: no", "no"),
        ("Answer: yes\nQuestion: Is water dry? Answer: no", "yes"),
    ],
)
def test_extract_yesno_from_real_world_shapes(text: str, expected: str) -> None:
    assert extract_answer(text, kind="yesno") == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is (B).", "B"),
        ("Answer: c", "C"),
        ("the answer is option D because ...", "D"),
        ("\\boxed{A}", "A"),
        ("I think **(E)** is right", "E"),
        ("B", "B"),
        ("Looking at (A) and (C), (C) fits.", "C"),
        ("A dog is an animal.", None),  # an article, not a choice
        ("Answer: A's reasoning is wrong", None),
        ("Answer: (B)\nQuestion: next one. Answer: (D)", "B"),
    ],
)
def test_extract_choice(text: str, expected: str | None) -> None:
    assert extract_answer(text, kind="choice") == expected


@pytest.mark.parametrize(
    ("text", "gold", "match"),
    [
        ("The answer is Paris.", "paris", True),
        ("Answer: the Eiffel Tower!", "Eiffel tower", True),
        ("\\boxed{George Washington}", "george washington", True),
        ("Lyon\nbecause it is big", "Paris", False),
        ("Answer: Paris, France.", "Paris", False),  # more words: not the same answer
    ],
)
def test_extract_and_match_text(text: str, gold: str, match: bool) -> None:
    assert answers_match(extract_answer(text, kind="text"), gold, kind="text") is match


def test_choice_and_text_gold_answers_normalise() -> None:
    assert normalize_answer("(b)", kind="choice") == "B"
    assert answers_match("b", "B", kind="choice")
    assert normalize_answer("  New   York ", kind="text") == "New York"
    with pytest.raises(ValueError, match="choice letter"):
        normalize_answer("Paris", kind="choice")
    with pytest.raises(ValueError, match="short text"):
        normalize_answer("  ", kind="text")


@given(st.integers(-(10**12), 10**12))
def test_extract_number_with_thousands_separators(n: int) -> None:
    assert extract_answer(f"We had 3 boxes and 10-2 = 8 more, so the total is {n:,}.") == str(n)
    assert extract_answer(f"... so the total is ${n:,}.") == str(n)


@given(_terminating)
def test_extract_returns_format_answer(x: Fraction) -> None:
    assert extract_answer(f"Step 1 gives 7. The result is {format_answer(x)}.") == format_answer(x)


# --- answers_match ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("predicted", "gold", "expected"),
    [
        ("72.0", "72", True),
        ("72", "72", True),
        ("1,200", "1200", True),
        ("$5", "5", True),
        ("yes", "Yes.", True),
        ("true", "yes", True),
        ("no", "yes", False),
        ("Paris", "Paris", True),
        ("0.5", "1/2", True),
        # rel_tol=1e-4 against 1/3: the bound is 1/30000, and 1/3 - 0.3333 is exactly 1/30000.
        ("0.33333", "1/3", True),
        ("0.3333", "1/3", True),
        ("0.3332", "1/3", False),
        ("0.333", "1/3", False),
        # Integers compare exactly: a relative tolerance would otherwise accept an off-by-one.
        ("15001", "15000", False),
        ("71", "72", False),
        # abs_tol for answers near zero.
        ("0.0000005", "0", True),
        ("0.00001", "0", False),
        (None, "5", False),
        ("5", "five", False),
    ],
)
def test_answers_match(predicted: str | None, gold: str, expected: bool) -> None:
    assert answers_match(predicted, gold) is expected


def test_answers_match_custom_tolerance() -> None:
    assert answers_match("0.33", "1/3", rel_tol=0.01)
    assert not answers_match("0.33333", "1/3", rel_tol=1e-6)


@given(st.fractions())
def test_answers_match_is_reflexive(x: Fraction) -> None:
    assert answers_match(format_answer(x), format_answer(x))


# --- real GSM8K solutions -----------------------------------------------------------------------

_GSM8K_FILES = ["train_socratic.jsonl", "test_socratic.jsonl", "train.jsonl", "test.jsonl"]


def _shared_data() -> Path:
    override = os.environ.get("SOCRATIC_SHARED_DATA")
    return Path(override) if override else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.shared_data
@pytest.mark.parametrize("name", _GSM8K_FILES)
def test_gsm8k_gold_extraction(name: str) -> None:
    path = _shared_data() / "gsm8k" / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    records = extracted = unchanged_by_calculator = 0
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            answer = json.loads(line)["answer"]
            records += 1
            gold = normalize_answer(answer.split("####")[-1], kind="number")
            found = extract_answer(answer)
            extracted += found == gold
            # The calculator must never change the final answer of a correct solution.
            unchanged_by_calculator += extract_answer(apply_calculator(answer).text) == found
    print(
        f"\n{name}: {records} records, {extracted} extracted answers equal gold, "
        f"{unchanged_by_calculator} unchanged by the calculator"
    )
    assert records > 0
    assert extracted == records
    assert unchanged_by_calculator == records
