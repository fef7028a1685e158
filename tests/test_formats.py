"""Every role's build -> parse round-trip, the prompt/target boundary, and lenient parsing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from socratic import formats
from socratic.formats import Example, FormatError, clean, examples_for
from socratic.records import Step

# Text a teacher or dataset might hand us: any printable text with stray whitespace and newlines,
# and words that look like our own markers.
_word = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=8),
    st.sampled_from(["Q1:", "A2:", "Answer:", "Problem:", "Steps:", "####", "<<3*4=12>>12", "$5"]),
)
_sep = st.sampled_from([" ", "  ", "\n", "\t", " \n "])
text = (
    st.lists(st.tuples(_word, _sep), min_size=1, max_size=12)
    .map(lambda parts: "".join(w + s for w, s in parts))
    .filter(lambda t: clean(t) != "")
)
steps = st.lists(st.builds(Step, text, text), min_size=1, max_size=6)


def _cleaned(ss: list[Step]) -> list[Step]:
    return [Step(clean(s.question), clean(s.answer)) for s in ss]


@given(text, steps)
def test_decomposer_round_trip(problem: str, ss: list[Step]) -> None:
    (ex,) = examples_for("decomposer", problem=problem, steps=ss)
    assert ex.prompt.endswith("Sub-questions:\n")
    assert formats.parse_decomposition(ex.target) == [clean(s.question) for s in ss]


@given(text, steps)
def test_solver_round_trip_one_example_per_step(problem: str, ss: list[Step]) -> None:
    exs = examples_for("solver", problem=problem, steps=ss)
    assert len(exs) == len(ss)
    for k, (ex, s) in enumerate(zip(exs, ss, strict=True), 1):
        assert formats.parse_solver(ex.target) == clean(s.answer)
        # The prompt holds the problem, exactly the k-1 earlier steps, then sub-question k.
        assert ex.prompt == formats.solver_prompt(problem, ss[: k - 1], s.question)
        assert ex.prompt.endswith(f"Q{k}: {clean(s.question)}\n")
        assert ex.prompt.count("\nA") == k - 1


@given(text, steps)
def test_unified_round_trip(problem: str, ss: list[Step]) -> None:
    (ex,) = examples_for("unified", problem=problem, steps=ss)
    assert formats.parse_unified(ex.target) == _cleaned(ss)


@given(text, st.lists(text, min_size=0, max_size=5), text)
def test_cot_round_trip(problem: str, lines: list[str], answer: str) -> None:
    solution = "\n".join(lines)
    (ex,) = examples_for("cot", problem=problem, solution=solution, answer=answer)
    body, got = formats.parse_cot(ex.target)
    assert got == clean(answer)
    assert body == "\n".join(x for x in (clean(line) for line in solution.splitlines()) if x)


@given(text, text)
def test_answer_round_trip(problem: str, answer: str) -> None:
    (ex,) = examples_for("answer", problem=problem, answer=answer)
    assert formats.parse_answer(ex.target) == clean(answer)


@given(text, steps, st.sampled_from(formats.ROLES))
def test_boundary_is_a_line_break(problem: str, ss: list[Step], role: str) -> None:
    """Prompts end in a newline and targets start with a marker: tokenizer-safe split point."""
    for ex in examples_for(role, problem=problem, steps=ss, solution="x = 1", answer="1"):
        assert ex.prompt.endswith("\n") and not ex.prompt.endswith("\n\n")
        assert ex.target[:1].strip() and "\n\n" not in ex.target
        assert ex.prompt.startswith(f"Problem: {clean(problem)}\n")


def test_concrete_layout() -> None:
    ss = [Step("How many clips in May?", "48/2 = <<48/2=24>>24"), Step("Total?", "48+24 = 72")]
    assert examples_for("solver", problem="Natalia sold clips.", steps=ss)[1] == Example(
        "Problem: Natalia sold clips.\nQ1: How many clips in May?\nA1: 48/2 = <<48/2=24>>24\n"
        "Q2: Total?\n",
        "A2: 48+24 = 72",
    )
    (dec,) = examples_for("decomposer", problem="Natalia sold clips.", steps=ss)
    assert dec.target == "Q1: How many clips in May?\nQ2: Total?"
    (cot,) = examples_for("cot", problem="p", solution="a\n\n b \n", answer="72")
    assert cot == Example("Problem: p\nSolution:\n", "a\nb\nAnswer: 72")


def test_tokenizer_boundary_with_a_real_bpe(tiny_model_dir) -> None:
    """Tokenising prompt and target apart gives the tokens of the whole text, for every role."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ss = [Step("How much is 3 times 4?", "3*4 = <<3*4=12>>12"), Step("And plus 2?", "14")]
    for role in formats.ROLES:
        for ex in examples_for(
            role, problem="Ann has 3 bags.", steps=ss, solution="s", answer="14"
        ):
            whole = tok(ex.prompt + ex.target, add_special_tokens=False)["input_ids"]
            parts = (
                tok(ex.prompt, add_special_tokens=False)["input_ids"]
                + tok(ex.target, add_special_tokens=False)["input_ids"]
            )
            assert parts == whole, role


@pytest.mark.parametrize(
    ("role", "kwargs", "message"),
    [
        ("decomposer", {"steps": []}, "at least one sub-question"),
        ("solver", {"steps": []}, "at least one step"),
        ("unified", {"steps": [Step("q", "  \n ")]}, "sub-answer 1 is empty"),
        ("cot", {"answer": "1"}, "need a solution"),
        ("answer", {}, "final answer is missing"),
        ("critic", {}, "unknown role 'critic'"),
    ],
)
def test_builders_reject_bad_input(role: str, kwargs: dict, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        examples_for(role, problem="p", **kwargs)
    with pytest.raises(FormatError, match="problem is empty"):
        formats.decomposer_prompt(" \n")


def test_parsers_take_the_well_formed_prefix_of_model_output() -> None:
    assert formats.parse_decomposition("Q1: a?\nQ2: b?\nA1: oops\nQ3: c?") == ["a?", "b?"]
    assert formats.parse_decomposition("\n\nQ1:   spaced   out ?\n") == ["spaced out ?"]
    assert formats.parse_decomposition("no questions here") == []
    assert formats.parse_solver("A3: 12 apples\nQ4: next?") == "12 apples"
    assert formats.parse_solver("12 apples") == "12 apples"
    assert formats.parse_solver("  ") == ""
    assert formats.parse_unified("Q1: a\nA1: b\nQ2: c\nProblem: x") == [Step("a", "b")]
    assert formats.parse_cot("step one\nno final line") == ("step one\nno final line", None)
    assert formats.parse_cot("x\nAnswer: 3\nAnswer: 4") == ("x\nAnswer: 3", "4")
    assert formats.parse_answer("Answer: 72\nProblem: next") == "72"
    assert formats.parse_answer("") is None


def test_solver_sequence_is_every_solver_example_in_one_text() -> None:
    steps = [Step("How  many?", "3 <<1+2=3>>3"), Step("Then\nwhat?", "4")]
    seq = formats.solver_sequence("Tom has\n3.", steps)
    assert (
        "".join(seq.pieces)
        == "Problem: Tom has 3.\nQ1: How many?\nA1: 3 <<1+2=3>>3\nQ2: Then what?\nA2: 4"
    )
    assert seq.targets == ("A1: 3 <<1+2=3>>3", "A2: 4")
    assert seq.examples() == examples_for("solver", problem="Tom has\n3.", steps=steps)
    with pytest.raises(FormatError, match="at least one step"):
        formats.solver_sequence("p", [])
    with pytest.raises(FormatError, match="sub-answer 2 is empty"):
        formats.solver_sequence("p", [Step("a", "b"), Step("c", " ")])


def test_prompts_are_built_from_nfc_text() -> None:
    """Serve normalises requests to NFC; a prompt built from a dataset's decomposed text must be
    the same one, or a problem gets other tokens over HTTP than in evaluation."""
    from socratic.formats import decomposer_prompt, solver_prompt

    assert decomposer_prompt("Jose\u0301 has 3?") == decomposer_prompt("Jos\u00e9 has 3?")
    q = "How many?"
    assert solver_prompt("Jose\u0301?", [], q) == solver_prompt("Jos\u00e9?", [], q)


@given(text, steps)
def test_iterative_decomposer_round_trip_one_example_per_step_then_the_end(
    problem: str, ss: list[Step]
) -> None:
    exs = examples_for("decomposer", problem=problem, steps=ss, decomposer_form="iterative")
    assert len(exs) == len(ss) + 1
    for k, ex in enumerate(exs):
        # the prompt holds the problem and exactly the k steps answered so far
        assert ex.prompt == formats.decomposer_step_prompt(problem, ss[:k])
        assert ex.prompt.count("\nA") == k and ex.prompt.endswith("\n")
        if k < len(ss):
            assert ex.target.startswith(f"Q{k + 1}: ")
            assert formats.parse_decomposer_step(ex.target) == clean(ss[k].question)
            assert not formats.decomposer_step_ends(ex.target)
        else:
            assert ex.target == formats.END
            assert formats.parse_decomposer_step(ex.target) is None
            assert formats.decomposer_step_ends(ex.target)
    # the first prompt is the "all" decomposer's: both forms are asked the same thing first
    assert exs[0].prompt == formats.decomposer_prompt(problem)
    assert formats.decomposer_sequence(problem, ss).examples() == exs


def test_iterative_decomposer_layout_and_lenient_parsing() -> None:
    ss = [Step("How many clips in May?", "48/2 = <<48/2=24>>24"), Step("Total?", "48+24 = 72")]
    exs = examples_for("decomposer", problem="Natalia sold clips.", steps=ss,
                       decomposer_form="iterative")  # fmt: skip
    assert exs[1] == Example(
        "Problem: Natalia sold clips.\nSub-questions:\nQ1: How many clips in May?\n"
        "A1: 48/2 = <<48/2=24>>24\n",
        "Q2: Total?",
    )
    assert exs[2].target == "Done."
    seq = formats.decomposer_sequence("Natalia sold clips.", ss)
    assert seq.targets == ("Q1: How many clips in May?", "Q2: Total?", "Done.")
    # model output: the first line decides; the number k is not checked; the rest is ignored
    assert formats.parse_decomposer_step("Q3: next?\nA3: 5\nQ4: more?") == "next?"
    assert formats.parse_decomposer_step("\n  Done.  \nQ2: x?") is None
    assert formats.decomposer_step_ends("\n  Done.  \nQ2: x?")
    for junk in ("", "I think we are done", "Q2:   ", "A1: 4"):
        assert formats.parse_decomposer_step(junk) is None
        assert not formats.decomposer_step_ends(junk)
    # a question worded "Done." is still a question: the marker is a bare line
    assert formats.parse_decomposer_step("Q2: Done.") == "Done."
    with pytest.raises(FormatError, match="unknown decomposer form 'each'"):
        examples_for("decomposer", problem="p", steps=ss, decomposer_form="each")
    with pytest.raises(FormatError, match="at least one sub-question"):
        examples_for("decomposer", problem="p", steps=[], decomposer_form="iterative")
    with pytest.raises(FormatError, match="at least one sub-question"):
        formats.decomposer_sequence("p", [])


def test_iterative_decomposer_boundary_with_a_real_bpe(tiny_model_dir) -> None:
    """The iterative decomposer's prompts and targets split at a line break too."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ss = [Step("How much is 3 times 4?", "3*4 = <<3*4=12>>12"), Step("And plus 2?", "14")]
    for ex in examples_for("decomposer", problem="Ann has 3 bags.", steps=ss,
                           decomposer_form="iterative"):  # fmt: skip
        whole = tok(ex.prompt + ex.target, add_special_tokens=False)["input_ids"]
        parts = (tok(ex.prompt, add_special_tokens=False)["input_ids"]
                 + tok(ex.target, add_special_tokens=False)["input_ids"])  # fmt: skip
        assert parts == whole, ex
