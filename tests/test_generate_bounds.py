"""The Generator on a model with few positions: long and garbage prompts are cut, never crash.

Past its positions GPT-2 fails with "index out of range in self" (what Serve returned as a 500).
The model here has 64 positions, so a few sub-questions of history already do not fit.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from socratic.formats import decomposer_prompt, solver_prompt
from socratic.generate import (
    Generator,
    bound_prompt,
    context_limit,
    fitting_groups,
    generation_budget,
    resolve_dtype,
)
from socratic.records import Step
from tests.support.tiny_model import build_tiny_model, sample_texts

POSITIONS = 64
PROBLEM = "Tom has 3 bags of 4 apples and buys 2 more. How many apples?"
HISTORY = [Step(f"How many in bag {k}?", f"{k}*4 = <<{k}*4={4 * k}>>{4 * k}") for k in range(1, 7)]
# RTL and LTR marks, a ZWJ sequence, combining marks, the last code point, a lone surrogate
# (what an escaped "\ud800" in JSON becomes), a BOM and a NUL.
GARBAGE = "\u202e\u200f\u200d👩\u200d💻e\u0301\u0301\U0010ffff\ud800\ufeff\x00" * 20


@pytest.fixture(scope="module")
def gen(tmp_path_factory: pytest.TempPathFactory) -> Generator:
    out = build_tiny_model(tmp_path_factory.mktemp("short"), sample_texts(), n_positions=POSITIONS)
    return Generator(out, max_new_tokens=16)


def _text(gen: Generator, ids: list[int]) -> str:
    return gen.tokenizer.decode(ids)


def test_a_prompt_that_fits_is_untouched(gen: Generator) -> None:
    prompt = decomposer_prompt("Tom has 3 apples. How many?")
    (ids,), (cut,) = gen.encode([prompt], 16)
    assert not cut and ids == gen.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    (c,) = gen.complete([prompt])
    assert not c.truncated and c.prompt_tokens == len(ids)


def test_a_long_history_keeps_the_problem_line_and_the_question(gen: Generator) -> None:
    prompt = solver_prompt(PROBLEM, HISTORY, "How many apples in all?")
    full = gen.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert len(full) > POSITIONS  # precondition: it cannot fit
    (ids,), (cut,) = gen.encode([prompt], 16)
    kept = _text(gen, ids)
    assert cut and len(ids) <= POSITIONS - 16
    assert kept.startswith(f"Problem: {PROBLEM}\n")
    assert kept.endswith("Q7: How many apples in all?\n")
    assert kept in prompt or kept.split("\n", 1)[1] in prompt  # whole lines, oldest dropped
    assert "Q1:" not in kept
    (c,) = gen.complete([prompt])
    assert c.truncated and c.prompt_tokens == len(ids)
    assert c.prompt_tokens + c.completion_tokens <= POSITIONS


def test_garbage_longer_than_the_model_is_cut_from_the_left(gen: Generator) -> None:
    """The problem line alone does not fit: its end (and the header after it) is kept, as
    training cuts a too-long prompt."""
    prompt = decomposer_prompt(f"{GARBAGE} How many apples?")
    (ids,), (cut,) = gen.encode([prompt], 16)
    assert cut and len(ids) == POSITIONS - 16
    assert _text(gen, ids).endswith(" How many apples?\nSub-questions:\n")
    out = gen.complete([prompt, decomposer_prompt(GARBAGE), decomposer_prompt(PROBLEM)])
    assert [c.truncated for c in out] == [True, True, False]
    assert all(c.prompt_tokens + c.completion_tokens <= POSITIONS for c in out)
    # Batching never changes a row: each gives alone what it gave in the batch.
    assert gen.complete([prompt])[0] == out[0]
    assert gen.complete([decomposer_prompt(PROBLEM)], calculator=True)[0].text == out[2].text


def test_max_new_tokens_past_the_positions_is_cut_to_fit(gen: Generator) -> None:
    assert generation_budget(500, POSITIONS) == 48  # a prompt keeps a quarter
    assert generation_budget(10, POSITIONS) == 10 and generation_budget(500, None) == 500
    prompt = solver_prompt(PROBLEM, HISTORY, "How many apples in all?")
    (c,) = gen.complete([prompt], max_new_tokens=500)
    assert c.truncated and c.completion_tokens <= 48
    assert c.prompt_tokens + c.completion_tokens <= POSITIONS


def test_bound_prompt_rules() -> None:
    ids = list(range(10))  # lines end after tokens 2, 5 and 7: [0 1 2][3 4 5][6 7][8 9]
    ends = [3, 6, 8]
    assert bound_prompt(ids, ends, 10) == (ids, False)
    assert bound_prompt(ids, ends, 8) == ([0, 1, 2, 6, 7, 8, 9], True)  # problem + whole lines
    assert bound_prompt(ids, ends, 5) == ([0, 1, 2, 8, 9], True)
    assert bound_prompt(ids, ends, 4) == ([6, 7, 8, 9], True)  # from the left, as training
    assert bound_prompt(ids, [], 3) == ([7, 8, 9], True)


def test_positions_come_from_the_config_or_a_sane_tokenizer(gen: Generator) -> None:
    assert gen.positions == context_limit(gen.model) == POSITIONS
    assert gen.tokenizer.model_max_length > 10**6  # transformers' "no limit": ignored
    gen.tokenizer.model_max_length = 40
    try:
        assert context_limit(gen.model, gen.tokenizer) == 40
    finally:
        gen.tokenizer.model_max_length = 10**30


def test_dtype_choices(tmp_path: Path, gen: Generator) -> None:
    import torch

    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("bf16", "cpu") is torch.bfloat16
    assert resolve_dtype("float32", "cuda") is torch.float32  # torch's own names work too
    with pytest.raises(ValueError, match="auto, bf16, fp16, fp32"):
        resolve_dtype("fp8", "cpu")
    half = Generator(gen.name, max_new_tokens=4, dtype="bf16", device="cpu")
    assert half.model.dtype is torch.bfloat16 and half.device == "cpu"
    (c,) = half.complete([decomposer_prompt(PROBLEM)])
    assert c.completion_tokens == 4
    assert gen.model.dtype is torch.float32  # auto on CPU


def test_each_prompt_is_bounded_by_its_own_limit_not_the_batch_largest(gen: Generator) -> None:
    """A long prompt asking for few tokens, batched with a short one asking for many, keeps its
    whole prompt (as alone); the pair runs as two groups, since together they would not fit."""
    long = solver_prompt(PROBLEM, [], "How many apples in all?")
    short = decomposer_prompt("Tom has 3 apples.")
    n_long = len(gen.tokenizer(long, add_special_tokens=False)["input_ids"])
    assert 40 < n_long <= POSITIONS - 4  # precondition: fits with 4 new tokens, not with 40
    together = gen.complete([long, short], max_new_tokens=[4, 40])
    alone = [gen.complete([long], max_new_tokens=4)[0], gen.complete([short], max_new_tokens=40)[0]]
    assert together == alone
    assert not together[0].truncated and together[0].prompt_tokens == n_long
    assert [c.completion_tokens for c in together] == [4, 40]


def test_fitting_groups() -> None:
    assert fitting_groups([10, 50], [40, 4], 64) == [[0], [1]]
    assert fitting_groups([10, 20], [40, 4], 64) == [[0, 1]]  # fits: one batch, in order
    assert fitting_groups([10, 12, 50, 55], [40, 30, 4, 8], 64) == [[0, 1], [2, 3]]
    assert fitting_groups([500, 600], [9, 9], None) == [[0, 1]]
