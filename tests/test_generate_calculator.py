"""The calculator inside decoding, on a real tiny model that has learnt wrong arithmetic.

With the calculator off the model writes the wrong values it was taught (so the test can fail);
with it on, every `<<expr=` it writes gets the right result forced, inside one batched
`generate` whose rows reach their `=` at different steps.
"""

from __future__ import annotations

import re
from functools import partial

import pytest

from socratic.calculator import evaluate, format_number
from socratic.formats import decomposer_prompt
from socratic.generate import Completion, Generator
from socratic.solve import solve_many
from tests.support.wrong_arith import (
    ALL,
    CASES,
    DECOMPOSITIONS,
    P1,
    P3,
    REFUSED,
    wrong_arith_model_dir,
)

SPAN = re.compile(r"<<([^<>=]*)=([^<>]*)>>")


@pytest.fixture(scope="module")
def gen(tmp_path_factory: pytest.TempPathFactory) -> Generator:
    return Generator(wrong_arith_model_dir(tmp_path_factory), max_new_tokens=64)


def _spans(text: str) -> list[tuple[str, str]]:
    return SPAN.findall(text)


def _steps_to_first_eq(gen: Generator, text: str) -> int:
    """Tokens a row writes up to and including its first span's `=`."""
    head = text[: text.index("=", text.index("<<")) + 1]
    return len(gen.tokenizer(head, add_special_tokens=False)["input_ids"])


def test_off_the_model_writes_its_wrong_arithmetic_unchanged(gen: Generator) -> None:
    """Precondition of every test here, and 'off = unchanged text': exactly what plain HF
    generate gives, with the wrong values the model learnt."""
    import torch

    prompts = [c.prompt for c in ALL]
    off = gen.complete(prompts)
    assert [c.text for c in off] == [c.wrong for c in ALL]
    assert all(not c.calculator and c.calculator_forced == c.calculator_refused == 0 for c in off)
    tok = gen.tokenizer
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = gen.model.generate(**batch, max_new_tokens=64, do_sample=False)
    plain = tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert [c.text for c in off] == plain
    for c in CASES:  # every taught value is wrong
        assert [v for _, v in _spans(c.wrong)] != list(c.right_values)


def test_on_every_span_gets_its_right_result_in_one_batch(gen: Generator) -> None:
    prompts = [c.prompt for c in CASES]
    # The rows of this batch reach their first `=` at different steps.
    assert len({_steps_to_first_eq(gen, c.wrong) for c in CASES}) >= 3
    on = gen.complete(prompts, calculator=True)
    for case, c in zip(CASES, on, strict=True):
        spans = _spans(c.text)
        assert [v for _, v in spans][: len(case.right_values)] == list(case.right_values), c.text
        for expr, value in spans:
            assert value == format_number(evaluate(expr)), c.text
        assert (c.calculator, c.calculator_forced, c.calculator_refused) == (True, len(spans), 0)
        assert c.text.startswith(case.wrong[: case.wrong.index("<<")])  # same text up to a span
    # Per-row state: each row alone gets what it got in the batch.
    for prompt, c in zip(prompts, on, strict=True):
        assert gen.complete([prompt], calculator=True)[0] == c


def test_results_after_a_merged_equals_token(gen: Generator) -> None:
    """Byte-level BPE merges `=-`: the model may write that token (its rest of the result is
    forced after it), or a plain `=` (the result is encoded on its own)."""
    tok = gen.tokenizer
    pieces = [tok.decode([i]) for i in tok("<<2-7=-4>>", add_special_tokens=False)["input_ids"]]
    assert "=-" in pieces  # the tokenizer really merges them
    lee, ada = CASES[2], CASES[5]
    out = gen.complete([lee.prompt, ada.prompt], calculator=True)
    assert "<<2-7=-5>>" in out[0].text and "<<3-5=-2>>" in out[1].text


def test_a_refused_expression_is_left_to_the_model_and_counted(gen: Generator) -> None:
    (c,) = gen.complete([REFUSED.prompt], calculator=True)
    assert c.text == REFUSED.wrong  # the model's own value stays
    assert (c.calculator_forced, c.calculator_refused) == (0, 1)
    assert "exponentiation" in c.calculator_errors[0] and "'2**3'" in c.calculator_errors[0]
    mixed = gen.complete([REFUSED.prompt, CASES[0].prompt], calculator=True)
    assert mixed[0] == c and mixed[1].calculator_forced == 1


def test_the_solving_loop_passes_it_through(gen: Generator) -> None:
    """Decoding's calculator in the loop: counted per Solution, no after-the-fact rewrite; text
    that bypassed it (plain strings) still gets the fallback fix."""
    assert gen.complete([decomposer_prompt(P1)])[0].text == DECOMPOSITIONS[P1]
    inside = solve_many([P1, P3], gen.complete, partial(gen.complete, calculator=True))
    assert [s.steps[0].answer for s in inside] == [
        # the model's own copy after the span stays: only the span is the calculator's
        gen.complete([CASES[0].prompt], calculator=True)[0].text.removeprefix("A1: "),
        gen.complete([CASES[2].prompt], calculator=True)[0].text.removeprefix("A1: "),
    ]
    assert "<<3*4=12>>" in inside[0].steps[0].answer and "<<2-7=-5>>" in inside[1].steps[0].answer
    assert [(s.calculator_forced, s.calculator_refused) for s in inside] == [(1, 0), (1, 0)]

    after = solve_many([P1], gen, gen)  # plain strings: the fallback recomputes span and copy
    assert after[0].steps[0].answer == "3*4 = <<3*4=12>>12 apples"
    assert after[0].calculator_forced == 0 and after[0].answer == "12"
    off = solve_many([P1], gen.complete, gen.complete, calculator=False)
    assert off[0].steps[0].answer == "3*4 = <<3*4=13>>13 apples"
    with pytest.raises(ValueError, match="calculator is off"):
        solve_many([P1], gen.complete, partial(gen.complete, calculator=True), calculator=False)


def test_completions_keep_the_old_positional_shape() -> None:
    c = Completion("x", 3, 1, "stop")
    assert (c.truncated, c.calculator, c.calculator_forced, c.calculator_errors) == (
        False, False, 0, (),
    )  # fmt: skip
