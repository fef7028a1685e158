"""The shared batched `generate`: batching must not change greedy output, counts must be true."""

from __future__ import annotations

from pathlib import Path

import pytest

from socratic.formats import decomposer_prompt, solver_prompt
from socratic.generate import Completion, Generator
from socratic.solve import solve, solve_many

PROBLEMS = [
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "A box holds 12 eggs. How many eggs are in 5 boxes?",
    "Sara reads 7 pages a day for 6 days. How many pages is that?",
]


@pytest.fixture(scope="module")
def gen(tiny_model_dir: Path) -> Generator:
    return Generator(tiny_model_dir, max_new_tokens=12)


def test_a_batch_gives_what_each_prompt_gives_alone(gen: Generator) -> None:
    prompts = [decomposer_prompt(p) for p in PROBLEMS] + [solver_prompt(PROBLEMS[0], [], "Why?")]
    alone = [gen([p])[0] for p in prompts]
    assert gen(prompts) == alone  # left padding + attention mask: padding never leaks in


def test_completions_count_tokens_and_say_why_they_stopped(gen: Generator) -> None:
    before = gen.tokens_generated
    out = gen.complete([decomposer_prompt(PROBLEMS[1])], max_new_tokens=5)
    c = out[0]
    assert isinstance(c, Completion)
    n_prompt = len(gen.tokenizer(decomposer_prompt(PROBLEMS[1]), add_special_tokens=False)[0])
    assert c.prompt_tokens == n_prompt
    assert (c.completion_tokens, c.finish_reason) == (5, "length")  # random weights: no EOS
    assert gen.tokens_generated == before + 5
    assert gen.complete([]) == []


def test_each_row_stops_at_its_own_limit(gen: Generator) -> None:
    """Per-row limits share one batch and give each row what a call with its limit gives."""
    prompts = [decomposer_prompt(p) for p in PROBLEMS]
    limits = [2, 9, 5]
    alone = [gen.complete([p], max_new_tokens=k)[0] for p, k in zip(prompts, limits, strict=True)]
    before = gen.tokens_generated
    together = gen.complete(prompts, max_new_tokens=limits)
    assert together == alone
    assert [c.completion_tokens for c in together] == limits  # random weights: no EOS
    assert gen.tokens_generated == before + sum(limits)
    with pytest.raises(ValueError, match="one limit"):
        gen.complete(prompts, max_new_tokens=[3, 3])


def test_stop_strings_cut_the_text(gen: Generator) -> None:
    full = gen.complete([decomposer_prompt(PROBLEMS[2])])[0]
    assert len(full.text) > 4, full
    stop = full.text[2:4]
    cut = gen.complete([decomposer_prompt(PROBLEMS[2])], stop=[stop, "never-there"])[0]
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.finish_reason == "stop"


def test_sampling_is_seeded(gen: Generator) -> None:
    p = [decomposer_prompt(PROBLEMS[0])]
    a = gen.complete(p, temperature=1.0, seed=7)[0].text
    assert a == gen.complete(p, temperature=1.0, seed=7)[0].text


def test_the_loop_counts_the_tokens_of_every_call(gen: Generator) -> None:
    """A generate that returns Completions makes each Solution carry its token cost."""
    many = solve_many(PROBLEMS, gen.complete, gen.complete, max_steps=2)
    for problem, sol in zip(PROBLEMS, many, strict=True):
        calls = 1 + len(sol.steps)
        assert sol.tokens == 12 * calls  # random weights never stop early
        assert solve(problem, gen, gen, max_steps=2).answer == sol.answer


def test_stop_strings_end_generation_early(gen: Generator) -> None:
    """A stopped row costs only the tokens up to its stop, not the whole max_new_tokens."""
    prompt = [decomposer_prompt(PROBLEMS[2])]
    full = gen.complete(prompt, max_new_tokens=30)[0]
    stop = full.text[3:6]
    cut = gen.complete(prompt, max_new_tokens=30, stop=[stop])[0]
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.completion_tokens < full.completion_tokens == 30


def test_a_row_stopped_by_a_stop_string_counts_no_padding_when_pad_is_eos(
    tiny_model_dir: Path,
) -> None:
    """With pad == EOS (GPT-2's usual setup) the pad after a stopped row looked like an EOS the
    model wrote, and usage counted one token too many."""
    gen = Generator(tiny_model_dir, max_new_tokens=30)
    gen.tokenizer.pad_token = gen.tokenizer.eos_token
    prompts = ["Tom has 3 apples", "Q1: How many", "Sara reads 7"]  # random weights: text
    stop = " m m"  # only row 0 writes it ("lesleslesles m m ..."); the others run to 30
    (alone,) = gen.complete(prompts[:1], stop=[stop])
    together = gen.complete(prompts, stop=[stop])
    assert alone.finish_reason == "stop" and alone.completion_tokens < 30
    assert together[0] == alone
    assert max(c.completion_tokens for c in together[1:]) > alone.completion_tokens
