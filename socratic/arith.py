"""`arith`: seeded, generated GSM8K-style word problems with gold Socratic steps.

Why a generated family: real GSM8K needs a GPU-sized student before any method learns, so
nothing on a 2-core machine could show that the students learn, or compare the methods on equal
terms. Here the difficulty is a knob (the number of operations) and every problem has exact
gold steps, so a tiny student trained for minutes can be scored per method and per length.

A problem follows one quantity through a chain of operations, each one sentence of the problem
and one gold step::

    Ava has 12 apples. Ava gives 5 apples to Ben. Ava puts the apples into 7 equal piles and
    keeps one pile. How many apples does Ava keep?
    Q1: How many apples does Ava have after giving some to Ben?
    A1: Ava has 12-5 = <<12-5=7>>7 apples.
    Q2: How many apples does Ava keep?
    A2: Ava keeps 7/7 = <<7/7=1>>1 apples.

Operations: buying / earning more (+), giving away / spending (-), "times as many as" (x),
equal sharing (/), a fraction "of" (`a*n/d`), packing into bags and keeping the remainder
(`a-k*x`), prices (count -> dollars) and buying at a unit price (dollars -> count). Every value
stays a positive integer no larger than `max_value`, every sub-answer carries one calculator
span in `socratic.calculator`'s syntax, the CoT solution is the sub-answers one per line (as in
GSM8K), and the final answer is the last step's result.

Knobs (`--dataset-config`, comma-separated `key=value`, e.g. `ops=2-2,long_ops=3-4,n_train=500`):

* `ops` (default `1-4`): operations per problem in `train` and `test`, an inclusive range in 1-8;
* `long_ops` (default `5-6`): operations per problem in `long`, the generalisation split;
* `operands` (default `2-12`): the range of the numbers the problems introduce;
* `max_value` (default 1000): no intermediate value exceeds it;
* `n_train`, `n_test`, `n_long` (defaults 2000, 100, 100): problems per split.

Splits come from the seed (`DatasetSpec.seed`), each from its own random stream, and their
problem texts are disjoint: `test` and `long` skip any text `train` has (and `long` any text
`test` has). `test` draws its lengths from the same `ops` range as `train`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace

from socratic.records import Problem, Step

SPLITS = ("train", "test", "long")
MAX_OPS = 8

NAMES = (
    "Ava", "Ben", "Cara", "Dan", "Eve", "Finn", "Gina", "Hugo", "Iris", "Jack", "Kira", "Leo",
    "Mia", "Noah", "Olga", "Paul", "Rosa", "Sam", "Tara", "Omar",
)  # fmt: skip
OBJECTS = (
    "apples", "pencils", "stickers", "marbles", "cookies", "books", "shells", "stamps",
    "cards", "eggs", "candles", "buttons",
)  # fmt: skip
ITEMS = ("a hat", "a ticket", "a lamp", "a scarf", "a game", "a plant")
GAIN_VERBS = (("buys", "buying"), ("finds", "finding"), ("picks", "picking"), ("wins", "winning"))


@dataclass(frozen=True)
class ArithConfig:
    """The knobs of the family; `parse` reads them from a `--dataset-config` string."""

    ops: tuple[int, int] = (1, 4)
    long_ops: tuple[int, int] = (5, 6)
    operands: tuple[int, int] = (2, 12)
    max_value: int = 1000
    n_train: int = 2000
    n_test: int = 100
    n_long: int = 100

    def __post_init__(self) -> None:
        for name in ("ops", "long_ops"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi <= MAX_OPS:
                raise ValueError(f"arith: {name} must be a range within 1-{MAX_OPS}, got {lo}-{hi}")
        lo, hi = self.operands
        if not 2 <= lo <= hi:
            raise ValueError(f"arith: operands must be a range with 2 <= low <= high: {lo}-{hi}")
        if self.max_value < 4 * hi:
            raise ValueError(f"arith: max_value {self.max_value} is too small for {lo}-{hi}")
        if min(self.n_train, self.n_test, self.n_long) < 0:
            raise ValueError("arith: split sizes must not be negative")

    @classmethod
    def parse(cls, text: str | None) -> ArithConfig:
        """`"ops=2-3,operands=2-9,n_train=500"` -> ArithConfig; unknown keys are an error."""
        cfg = cls()
        if not text:
            return cfg
        known = {f.name: f for f in fields(cls)}
        changes: dict[str, object] = {}
        for part in (p.strip() for p in text.split(",") if p.strip()):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in known:
                raise ValueError(
                    f"arith config: cannot read {part!r}; use key=value with keys "
                    f"{', '.join(known)} (e.g. ops=2-4,operands=2-12)"
                )
            try:
                if isinstance(getattr(cfg, key), tuple):
                    lo, _, hi = value.partition("-")
                    changes[key] = (int(lo), int(hi or lo))
                else:
                    changes[key] = int(value)
            except ValueError:
                raise ValueError(f"arith config: {key}={value!r} is not a number") from None
        return replace(cfg, **changes)

    def size(self, split: str) -> int:
        return {"train": self.n_train, "test": self.n_test, "long": self.n_long}[split]

    def op_range(self, split: str) -> tuple[int, int]:
        return self.long_ops if split == "long" else self.ops


@dataclass
class _State:
    holder: str
    kind: str  # "count" (of `noun`) or "money" (dollars)
    noun: str
    value: int


@dataclass(frozen=True)
class _Op:
    sentence: str
    question: str
    answer: str
    state: _State


def _span(expr: str, value: int) -> str:
    return f"{expr} = <<{expr}={value}>>{value}"


def _unit(s: _State) -> str:
    return s.noun if s.kind == "count" else "dollars"


def _divisors(a: int, lo: int, hi: int) -> list[int]:
    return [d for d in range(lo, hi + 1) if a % d == 0 and a // d >= 1]


OpMaker = Callable[[random.Random, _State, ArithConfig], "_Op | None"]


def _add(rng: random.Random, s: _State, c: ArithConfig) -> _Op | None:
    x = rng.randint(*c.operands)
    r = s.value + x
    if r > c.max_value:
        return None
    if s.kind == "count":
        verb, ing = rng.choice(GAIN_VERBS)
        sentence = f"{s.holder} {verb} {x} more {s.noun}."
        question = f"How many {s.noun} does {s.holder} have after {ing} more?"
    else:
        sentence = f"{s.holder} earns ${x} more."
        question = f"How much money does {s.holder} have after earning more?"
    answer = f"{s.holder} has {_span(f'{s.value}+{x}', r)} {_unit(s)}."
    return _Op(sentence, question, answer, replace(s, value=r))


def _sub(rng: random.Random, s: _State, c: ArithConfig) -> _Op | None:
    lo, hi = c.operands
    if s.value - lo < 1:
        return None
    x = rng.randint(lo, min(hi, s.value - 1))
    r = s.value - x
    if s.kind == "count":
        friend = rng.choice([n for n in NAMES if n != s.holder])
        sentence = f"{s.holder} gives {x} {s.noun} to {friend}."
        question = f"How many {s.noun} does {s.holder} have after giving some to {friend}?"
    else:
        item = rng.choice(ITEMS)
        sentence = f"{s.holder} spends ${x} on {item}."
        question = f"How much money does {s.holder} have after buying {item}?"
    answer = f"{s.holder} has {_span(f'{s.value}-{x}', r)} {_unit(s)} left."
    return _Op(sentence, question, answer, replace(s, value=r))


def _times(rng: random.Random, s: _State, c: ArithConfig) -> _Op | None:
    hi = min(c.operands[1], c.max_value // s.value)
    if hi < c.operands[0]:
        return None
    x = rng.randint(c.operands[0], hi)
    r = s.value * x
    friend = rng.choice([n for n in NAMES if n != s.holder])
    if s.kind == "count":
        sentence = f"{friend} has {x} times as many {s.noun} as {s.holder}."
        question = f"How many {s.noun} does {friend} have?"
    else:
        sentence = f"{friend} has {x} times as much money as {s.holder}."
        question = f"How much money does {friend} have?"
    answer = f"{friend} has {_span(f'{s.value}*{x}', r)} {_unit(s)}."
    return _Op(sentence, question, answer, replace(s, holder=friend, value=r))


def _share(rng: random.Random, s: _State, c: ArithConfig) -> _Op | None:
    options = [d for d in _divisors(s.value, *c.operands) if d < s.value]
    if not options:
        return None
    x = rng.choice(options)
    r = s.value // x
    if s.kind == "count":
        sentence = f"{s.holder} puts the {s.noun} into {x} equal piles and keeps one pile."
        question = f"How many {s.noun} does {s.holder} keep?"
    else:
        sentence = f"{s.holder} splits the money equally into {x} envelopes and keeps one."
        question = f"How much money does {s.holder} keep?"
    answer = f"{s.holder} keeps {_span(f'{s.value}/{x}', r)} {_unit(s)}."
    return _Op(sentence, question, answer, replace(s, value=r))


def _fraction(rng: random.Random, s: _State, c: ArithConfig) -> _Op | None:
    options = [d for d in _divisors(s.value, 2, min(10, c.operands[1])) if d < s.value]
    if not options:
        return None
    d = rng.choice(options)
    n = rng.randint(1, d - 1)
    r = s.value * n // d
    if s.kind == "count":
        sentence = f"{s.holder} keeps {n}/{d} of the {s.noun} and gives the rest away."
        question = f"How many {s.noun} does {s.holder} keep after giving the rest away?"
    else:
        sentence = f"{s.holder} saves {n}/{d} of the money and spends the rest."
        question = f"How much money does {s.holder} save?"
    verb = "keeps" if s.kind == "count" else "saves"
    answer = f"{s.holder} {verb} {_span(f'{s.value}*{n}/{d}', r)} {_unit(s)}."
    return _Op(sentence, question, answer, replace(s, value=r))


def _remainder(rng: random.Random, s: _State, c: ArithConfig) -> _Op | None:
    if s.kind != "count":
        return None
    lo, hi = c.operands
    options = [x for x in range(lo, hi + 1) if (s.value - 1) // x >= 1]
    if not options:
        return None
    x = rng.choice(options)
    k = rng.randint(1, (s.value - 1) // x)
    r = s.value - k * x
    bags = "1 bag" if k == 1 else f"{k} bags"
    sentence = f"{s.holder} packs the {s.noun} into {bags} of {x} and keeps the rest."
    question = f"How many {s.noun} does {s.holder} keep after packing the bags?"
    answer = f"{s.holder} keeps {_span(f'{s.value}-{k}*{x}', r)} {s.noun}."
    return _Op(sentence, question, answer, replace(s, value=r))


def _price(rng: random.Random, s: _State, c: ArithConfig) -> _Op | None:
    if s.kind != "count":
        return None
    hi = min(c.operands[1], c.max_value // s.value)
    if hi < c.operands[0]:
        return None
    x = rng.randint(c.operands[0], hi)
    r = s.value * x
    sentence = f"{s.holder} sells each of the {s.noun} for ${x}."
    question = f"How much money does {s.holder} get for the {s.noun}?"
    answer = f"{s.holder} gets {_span(f'{s.value}*{x}', r)} dollars."
    return _Op(sentence, question, answer, replace(s, kind="money", value=r))


def _buy(rng: random.Random, s: _State, c: ArithConfig) -> _Op | None:
    if s.kind != "money":
        return None
    options = _divisors(s.value, *c.operands)
    if not options:
        return None
    x = rng.choice(options)
    r = s.value // x
    noun = rng.choice(OBJECTS)
    sentence = f"{s.holder} spends all the money on {noun} at ${x} each."
    question = f"How many {noun} does {s.holder} buy?"
    answer = f"{s.holder} buys {_span(f'{s.value}/{x}', r)} {noun}."
    return _Op(sentence, question, answer, replace(s, kind="count", noun=noun, value=r))


OPS: tuple[OpMaker, ...] = (_add, _sub, _times, _share, _fraction, _remainder, _price, _buy)


def make_problem(rng: random.Random, n_ops: int, cfg: ArithConfig) -> tuple[str, list[Step], str]:
    """(question, gold steps, final answer) of one problem with `n_ops` operations."""
    lo, hi = cfg.operands
    if rng.random() < 0.75:
        state = _State(rng.choice(NAMES), "count", rng.choice(OBJECTS), rng.randint(lo, 4 * hi))
        intro = f"{state.holder} has {state.value} {state.noun}."
    else:
        state = _State(rng.choice(NAMES), "money", "", rng.randint(lo, 4 * hi))
        intro = f"{state.holder} has ${state.value}."
    sentences, steps = [intro], []
    for _ in range(n_ops):
        while True:  # _add and _sub always apply to a value of at least 1 + low, so this ends
            op = rng.choice(OPS)(rng, state, cfg)
            if op is not None:
                break
        sentences.append(op.sentence)
        steps.append(Step(op.question, op.answer))
        state = op.state
    question = " ".join(sentences) + " " + steps[-1].question
    return question, steps, str(state.value)


def _texts(cfg: ArithConfig, seed: int, split: str, exclude: set[str]) -> Iterator[Problem]:
    rng = random.Random(f"arith/{seed}/{split}")
    seen = set(exclude)
    n, misses = 0, 0
    while n < cfg.size(split):
        question, steps, answer = make_problem(rng, rng.randint(*cfg.op_range(split)), cfg)
        if question in seen:
            misses += 1
            if misses > 100 * cfg.size(split) + 1000:
                raise ValueError(
                    f"arith: cannot find {cfg.size(split)} distinct {split} problems with "
                    f"these knobs; widen operands or lower n_{split}"
                )
            continue
        seen.add(question)
        yield Problem(
            id=f"arith/{split}/{n}",
            dataset="arith",
            split=split,
            question=question,
            answer=answer,
            solution="\n".join(s.answer for s in steps),
            steps=tuple(steps),
        )
        n += 1


def generate(cfg: ArithConfig, seed: int, split: str) -> Iterator[Problem]:
    """The problems of one split. `test` and `long` never repeat a text of an earlier split."""
    if split not in SPLITS:
        raise ValueError(f"arith has splits {', '.join(SPLITS)}, not {split!r}")
    exclude: set[str] = set()
    for earlier in SPLITS[: SPLITS.index(split)]:
        exclude.update(p.question for p in _texts(cfg, seed, earlier, exclude))
    yield from _texts(cfg, seed, split, exclude)
