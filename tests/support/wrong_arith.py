"""A real tiny HF model that has learnt to get its arithmetic wrong, for calculator tests.

A 2-layer GPT-2 with a byte-level BPE trained on the spot (`tests.support.tiny_model`), then
trained until it has memorised solver, unified and CoT texts whose every `<<expr=value>>`
span carries a wrong value (the true result + 1, or a dropped fraction, or a dropped sign).
It memorises them, so with the calculator off it writes exactly those wrong values, and each
text reaches its `=` after a different number of tokens. Nothing here is a mock: the model is
saved as a plain HF directory and loaded by `socratic.generate.Generator` like any student.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from socratic.formats import cot_prompt, decomposer_prompt, solver_prompt, unified_prompt


@dataclass(frozen=True)
class Case:
    """A prompt, the wrong text the model is taught to write, and the spans' true results."""

    prompt: str
    wrong: str
    right_values: tuple[str, ...]


P1 = "Tom has 3 bags of 4 apples. How many apples does he have?"
P2 = "A shop sells toys. Each toy costs 5 dollars and Ann buys 6 toys. How much does she pay?"
P3 = "Lee had 2 pens and lost 7. What is his balance of pens?"
P4 = "Kim has 8 cards and splits them in half, then gets 3 more. How many cards?"
P5 = "A cube has side 2. What is its volume?"
P6 = "Bo shares 7 cakes between 2 friends. How much does each get?"
P7 = "Ada has 3 coins and spends 5. What is her balance?"

CASES = (
    Case(solver_prompt(P1, [], "How many apples?"), "A1: 3*4 = <<3*4=13>>13 apples", ("12",)),
    Case(
        solver_prompt(P2, [], "How much does she pay?"),
        "A1: She pays 5 dollars for each of the 6 toys, so 5*6 = <<5*6=31>>31 dollars",
        ("30",),
    ),
    Case(solver_prompt(P3, [], "What is the balance?"), "A1: 2-7 = <<2-7=-4>>-4 pens", ("-5",)),
    Case(
        unified_prompt(P4),
        "Q1: How many in each half?\nA1: 8/2 = <<8/2=5>>5\n"
        "Q2: How many cards?\nA2: 5+3 = <<5+3=9>>9",
        ("4", "8"),
    ),
    Case(cot_prompt(P6), "7/2 = <<7/2=3>>3 cakes each.\nAnswer: 3", ("3.5",)),
    # A plain '=' before a negative result: `=-` would merge, so the result is encoded alone.
    Case(solver_prompt(P7, [], "What is her balance?"), "A1: 3-5 = <<3-5=2>>2 coins", ("-2",)),
)
# The calculator refuses `**`: the model's own value stays, and the refusal is counted.
REFUSED = Case(solver_prompt(P5, [], "What is the volume?"), "A1: 2**3 = <<2**3=9>>9", ())
ALL = (*CASES, REFUSED)
# Decompositions for the solving loop: P1 and P3 are asked the sub-question their solver
# prompt above was built with.
DECOMPOSITIONS = {P1: "Q1: How many apples?", P3: "Q1: What is the balance?"}


def build_wrong_arith_model(
    out_dir: str | Path, max_steps: int = 600, target_loss: float = 0.01, lr: float = 1e-2
) -> Path:
    """Train until the mean token loss is below `target_loss` and save the model under
    `out_dir` (a few hundred steps, seconds on 2 idle cores)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.support.tiny_model import build_tokenizer

    texts = [c.prompt + c.wrong for c in ALL]
    texts += [decomposer_prompt(p) + q for p, q in DECOMPOSITIONS.items()]
    # Extra copies of a negative result make the BPE merge `=-` into one token, the case where
    # a tokenizer joins `=` with what follows it.
    tokenizer = build_tokenizer(texts * 4 + ["x=-1 y=-2 z=-3 <<1-2=-1>>"] * 8, vocab_size=400)
    eos = tokenizer.eos_token_id
    seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
    targets = [list(s) for s in seqs]
    # With the calculator on, the model must go on with its own text after a forced value, not
    # wander off it: what it writes there would then hang on the machine's float rounding (CI
    # once saw `<<33+/2=`). So it also learns each text as decoding sees it with every span's
    # value forced right. The forced tokens carry no loss, so nothing competes with the wrong
    # values it writes itself.
    for case in CASES:
        ids, labels = _forced_sequence(tokenizer, case)
        seqs.append(ids + [eos])
        targets.append(labels + [eos])
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=256, n_embd=64, n_layer=2, n_head=2,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    labels = torch.full((len(seqs), width), -100)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, t) in enumerate(zip(seqs, targets, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(t)] = torch.tensor(t)
        mask[i, : len(s)] = 1
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small gain nothing from a second thread
    try:
        model.train()
        for _ in range(max_steps):  # until memorised: greedy decoding then repeats the texts
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            if loss.item() < target_loss:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def wrong_arith_model_dir(tmp_path_factory: Any) -> Path:
    """The model, built once per pytest session (every module that asks shares it)."""
    out = tmp_path_factory.getbasetemp() / "wrong-arith"
    if not (out / "config.json").is_file():
        build_wrong_arith_model(out)
    return out


def _forced_sequence(tokenizer: Any, case: Case) -> tuple[list[int], list[int]]:
    """Token ids of `case` as `generate` with the calculator writes it: the model's own tokens up
    to each span's `=` (a merged `=-` included), the tokens `CalculatorForcing` forces for the
    right value and `>>` (label -100), then the model's own tokens after its wrong `>>`."""
    from socratic.generate import CalculatorForcing

    text = case.prompt + case.wrong
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    wrong, offsets = enc["input_ids"], enc["offset_mapping"]
    forcing = CalculatorForcing(tokenizer, 0, set(), {})
    ids: list[int] = []
    labels: list[int] = []
    done = 0  # tokens of `wrong` already placed
    spans = list(re.finditer(r"<<[^<>=]*=([^<>]*)>>", text))
    for m, right in zip(spans, case.right_values, strict=False):
        eq = m.start(1) - 1
        # the token holding the span's `=`, and the one that ends its `>>`
        at_eq = next(i for i, (s, e) in enumerate(offsets) if s <= eq < e)
        after_gt = next(i for i, (_, e) in enumerate(offsets) if e == m.end()) + 1
        if offsets[after_gt - 1][0] < m.start(1):
            raise ValueError(f"the tokenizer merges a value into `=`/`>>` in {m.group(0)!r}")
        own = wrong[done : at_eq + 1]
        ids += own
        labels += own
        written = text[eq + 1 : offsets[at_eq][1]]  # what a merged `=-` writes after `=`
        remainder = (right + ">>").removeprefix(written)
        forced = forcing._encode_after(tokenizer.decode(wrong[: at_eq + 1])[m.start() :], remainder)
        ids += forced
        labels += [-100] * len(forced)
        done = after_gt
    ids += wrong[done:]
    labels += wrong[done:]
    return ids, labels
