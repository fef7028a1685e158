"""Annotation Parquet -> one role's training examples -> token sequences -> padded batches.

Everything a training worker needs before the model sees a tensor, kept free of Ray and DeepSpeed
so it is tested on its own (and on the real datasets) in seconds. Texts come only from
`socratic.formats.examples_for`: serving and evaluation build their prompts there too, so what a
student is trained on is exactly what it is later asked.

On a worker::

    rows = read_accepted(paths)                      # accepted teacher rows only
    examples, stats = build_examples(rows, role, packed=True)  # unformattable rows counted
    data = tokenize(examples, tokenizer, max_length) # loss only on target + EOS
    for epoch in range(epochs):
        order = batches(data.lengths, micro_batch_size, seed=seed, epoch=epoch)
        for idx in shard(order, rank, world_size):
            batch = collate([data[i] for i in idx], tokenizer.pad_token_id)

The solver's data is packed by default (`packed=True`, `--solver-examples packed`): one sequence
`problem Q1 A1 ... Qn An` per problem with the loss on every answer, instead of n examples that
each re-read the prompt. Labels carry the difference: at the last token of each Ak the label is
EOS while the next input token stays the real "\n", so the student still learns to stop after
one answer. Every answer's context is token for token its per-example prompt (pieces are
tokenised apart and joined, see `tokenize`), so the losses are the same at ~2.8x fewer tokens on
GSM8K (ENVIRONMENT.md; `tests/test_packed_solver.py` checks both claims).

Every rank computes the same `batches` (same seed and epoch) and takes its own `shard`, so no
sampler state is shared between workers and a restarted worker group replays the same order.
"""

from __future__ import annotations

import random
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from socratic.formats import (
    ROLES,
    Example,
    FormatError,
    SolverSequence,
    parse_cot,
    training_examples,
)
from socratic.generate import bound_prompt, token_line_ends
from socratic.records import (
    ACCEPTED,
    ANNOTATION_SCHEMA,
    conform_annotations,
    steps_from,
)
from trainers.config import check_positions, roles_of

IGNORE_INDEX = -100  # the label torch's cross-entropy (and every HF causal LM) skips
MEGA_BATCH_FACTOR = 50  # batches per length-sorted window, as in HF's LengthGroupedSampler
BOUNDARY_CHECK_EXAMPLES = 8  # examples whose pieces `tokenize` re-encodes joined, once per set

# --- reading annotation Parquet -----------------------------------------------------------------


def read_accepted(paths: str | Sequence[str]) -> list[dict[str, Any]]:
    """The accepted rows of annotation Parquet, as dicts, in file order.

    Each path is a Parquet file or a folder searched recursively for `*.parquet`, given locally
    or as a pyarrow filesystem URI (`s3://...`, `gs://...`). Each path must contribute rows: an
    empty folder or an all-rejected run is almost always a wrong path or a failed annotation job,
    and training on the other paths alone would hide that. Errors name the path, and for an
    all-rejected path say why the rows were rejected, so the fix is visible without opening
    the Parquet.
    """
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise ValueError("no annotation paths given")
    rows: list[dict[str, Any]] = []
    for path in paths:
        rows.extend(_read_path(path))
    return rows


def _read_path(path: str) -> list[dict[str, Any]]:
    if "://" in path:
        fs, root = pafs.FileSystem.from_uri(path)
        prefix = path.split("://", 1)[0] + "://"  # from_uri drops it; error messages put it back
    else:
        fs, root = pafs.LocalFileSystem(), str(Path(path).resolve())
        prefix = ""
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"annotation data not found: {path}")
    if info.type == pafs.FileType.File:
        files = [root]
    else:
        selector = pafs.FileSelector(root, recursive=True)
        files = sorted(
            f.path
            for f in fs.get_file_info(selector)
            if f.type == pafs.FileType.File and f.path.endswith(".parquet")
        )
    tables = [_read_file(fs, f, prefix + f) for f in files]
    total = sum(t.num_rows for t in tables)
    if total == 0:
        what = f"{len(files)} parquet file(s) with 0 rows" if files else "no *.parquet files"
        raise ValueError(
            f"{path}: no annotation rows ({what}); point --data at the output folder of "
            "pipelines/annotate.py"
        )
    accepted = [t.filter(pc.equal(t.column("status"), ACCEPTED)) for t in tables]
    rows = [r for t in accepted for r in t.to_pylist()]
    if not rows:
        reasons = Counter(_reason_group(r) for t in tables for r in t.column("reason").to_pylist())
        listed = ", ".join(f"{k} {n}" for k, n in reasons.most_common())
        raise ValueError(
            f"{path}: none of the {total} rows is accepted (rejected: {listed}); "
            "a student would learn nothing from it - check the teacher run's summary.json"
        )
    return rows


def _read_file(fs: pafs.FileSystem, path: str, shown: str) -> pa.Table:
    try:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            have = set(pf.schema_arrow.names)
            table = pf.read(columns=[n for n in ANNOTATION_SCHEMA.names if n in have])
            return conform_annotations(table, shown)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{shown}: not a readable Parquet file: {e}") from e


def _reason_group(reason: str | None) -> str:
    """`api_error: 429: Too many requests` -> `api_error: 429`, as the annotation summary counts."""
    if not reason:
        return "no reason"
    parts = reason.split(": ")
    return ": ".join(parts[:2]) if parts[0] == "api_error" else reason


# --- rows -> examples -----------------------------------------------------------------------------


@dataclass
class BuildStats:
    """What `build_examples` did with its rows; the training summary prints it."""

    role: str
    rows: int = 0
    examples: int = 0
    skipped: int = 0  # rows that gave no example (a FormatError)
    skip_reasons: Counter[str] = field(default_factory=Counter)


def build_examples(
    rows: Iterable[Mapping[str, Any]],
    role: str,
    *,
    packed: bool = False,
    decomposer_form: str = "all",
) -> tuple[list[Example | SolverSequence], BuildStats]:
    """Every training example the rows give `role`, and how many rows could not be formatted.

    With `packed`, the solver gets one `SolverSequence` per row instead of one `Example` per
    sub-question (`examples` then counts the sequences); other roles have one example per row
    and are unchanged. A shared student (`decomposer+solver`, `trainers.config.roles_of`) gets
    every part's examples; `skipped` then counts a row once per part it failed.
    `decomposer_form` "iterative" gives the decomposer one example per
    sub-question plus the end one (`socratic.formats.examples_for`), with `packed` one
    `decomposer_sequence` per row instead.

    Teacher samples of one problem are all kept (several decompositions of a problem is what
    `--samples` pays for). A row that cannot be formatted - no steps for a step role, an empty
    sub-question - is skipped and counted rather than raised: one bad teacher reply should not
    stop a training run, but the count shows up in its summary. An unknown role is raised.
    """
    if len(parts := roles_of(role)) > 1:  # one student on several roles: their union
        rows = list(rows)
        stats, examples = BuildStats(role, rows=len(rows)), []
        for part in parts:
            got, s = build_examples(rows, part, packed=packed, decomposer_form=decomposer_form)
            examples += got
            stats.skipped += s.skipped
            stats.skip_reasons.update(s.skip_reasons)
        stats.examples = len(examples)
        return examples, stats
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    stats = BuildStats(role)
    examples: list[Example | SolverSequence] = []
    for row in rows:
        stats.rows += 1
        try:
            args = _format_args(row, role)
            got = training_examples(role, **args, decomposer_form=decomposer_form, packed=packed)
        except FormatError as e:
            stats.skipped += 1
            stats.skip_reasons[str(e)] += 1
            continue
        examples.extend(got)
    stats.examples = len(examples)
    return examples, stats


def _format_args(row: Mapping[str, Any], role: str) -> dict[str, Any]:
    steps = steps_from(row.get("steps"))
    args: dict[str, Any] = {"problem": row["question"], "steps": steps, "answer": row["answer"]}
    if role == "cot":
        args["solution"] = _cot_solution(row, steps)
    return args


def _cot_solution(row: Mapping[str, Any], steps: Sequence[Any]) -> str | None:
    """The worked solution a cot student learns: the teacher's CoT text, else the step answers.

    A Socratic row's sub-answers are its solution sentences (`48/2 = <<48/2=24>>24`), one per
    line, so Socratic teacher runs also train the CoT baseline. None means there is nothing to
    learn from and `examples_for` raises.
    """
    if row.get("style") == "cot":
        solution, _ = parse_cot(row.get("raw") or "")
        return solution or None
    return "\n".join(s.answer for s in steps) or None


# --- examples -> token sequences ------------------------------------------------------------------


@dataclass
class TokenizedSet:
    """Token sequences of one role, with what tokenising cost (for the training summary).

    `labels[i]` is `IGNORE_INDEX` on prompt tokens and equals `input_ids[i]` on target + EOS, so
    the loss is on what the student must write and never on the problem it is given.
    """

    input_ids: list[list[int]]
    labels: list[list[int]]
    examples: int  # (prompt, target) pairs given, a packed sequence's answers each counted
    truncated: int  # kept, with prompt tokens cut (`socratic.generate.bound_prompt`)
    dropped: int  # target too long to fit even with the shortest allowed prompt
    tokens: int  # all tokens kept, prompt + target + EOS
    target_tokens: int  # tokens carrying loss
    split: int = 0  # problems whose packed sequence exceeded max_length, cut into several

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        return self.input_ids[i], self.labels[i]

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


def tokenize(
    examples: Sequence[Example | SolverSequence],
    tokenizer: Any,
    max_length: int,
    *,
    min_prompt_tokens: int = 8,
    mask_calculator_results: bool = False,
    check_boundaries: int = BOUNDARY_CHECK_EXAMPLES,
) -> TokenizedSet:
    """Token ids and loss labels of `examples`: prompt + target + EOS, at most `max_length`.

    Prompt and target are encoded apart (no special tokens), which equals encoding them joined
    because every prompt ends in a newline (see `socratic.formats`) - for byte-level BPEs; the
    first examples are checked (`check_token_boundaries`). Apart, the boundary is known
    exactly. A sequence that is too long loses prompt tokens by the rule the Generator serves
    with (`socratic.generate.bound_prompt`): the problem line and the last lines (the
    sub-question being answered) stay, the oldest steps between them go; only a problem line
    that alone is too long loses its start. The target must stay whole, since a cut target
    teaches the student to stop mid-answer without EOS. If fewer than
    `min_prompt_tokens` of prompt would remain (at least 1, so the first target token is
    predicted from something), the example is dropped and counted.

    A `SolverSequence` gives one sequence (or, past `max_length`, a few) whose answers each see
    exactly the tokens their per-example prompt gives: its pieces are encoded apart and joined,
    so the ids are the per-example pieces by construction (see `_add_packed`).

    `mask_calculator_results` takes the loss off the tokens the calculator forces at inference
    (the result and `>>` after `<<expr=`, `socratic.generate.CalculatorForcing`): the student
    never has to write them, and learning to predict them is learning arithmetic. The tokens
    stay in the input, so what follows a span still learns to copy its result.

    The first `check_boundaries` examples are encoded joined too (`check_token_boundaries`),
    and a tokenizer for which that differs from the pieces gets a `TokenBoundaryWarning`.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; every target must end with one")
    if min_prompt_tokens < 1:
        raise ValueError("min_prompt_tokens must be at least 1")
    if max_length < min_prompt_tokens + 2:
        raise ValueError(f"max_length {max_length} leaves no room for a prompt and a target")
    # One tokenizer call for every piece of text: prompt/target, or a sequence's pieces.
    texts = [
        piece
        for ex in examples
        for piece in (ex.pieces if isinstance(ex, SolverSequence) else (ex.prompt, ex.target))
    ]
    encoded = _encode(tokenizer, texts, forced=mask_calculator_results)
    if check_boundaries > 0:
        check_token_boundaries(tokenizer, examples, encoded, limit=check_boundaries)
    ids = iter(encoded)
    out = TokenizedSet([], [], 0, 0, 0, 0, 0)
    for ex in examples:
        if isinstance(ex, SolverSequence):
            pieces = [next(ids) for _ in ex.pieces]
            _add_packed(out, pieces[0::2], pieces[1::2], eos, max_length, min_prompt_tokens)
        else:
            out.examples += 1
            p, t = next(ids), next(ids)
            _add_example(out, p, t + [eos], max_length, min_prompt_tokens)
    return out


class TokenBoundaryWarning(UserWarning):
    """A tokenizer for which a prompt and its target encoded apart are not the tokens of the two
    encoded as one text (see `check_token_boundaries`)."""


def check_token_boundaries(
    tokenizer: Any,
    examples: Sequence[Example | SolverSequence],
    encoded: Sequence[Sequence[int]],
    *,
    limit: int = BOUNDARY_CHECK_EXAMPLES,
) -> list[str]:
    """Warn (once per call) if encoding the first `limit` examples' pieces apart does not give
    the tokens of their joined text; returns one line per such example.

    TRL checks the same for its SFT data ("Mismatch between tokenized prompt and the start of
    tokenized prompt+completion"), because it masks the prompt by the length of the prompt
    encoded alone. `tokenize` does not rely on the property for its labels: prompt and target
    are encoded apart and concatenated, so the prompt/target boundary, and with it the loss
    mask, is exact whatever the tokenizer does. Hence a warning, not an error. What breaks is
    agreement with inference: serving encodes a whole solver prompt (problem and earlier steps)
    as one text, while the packed solver trains on its pieces encoded apart; and a target's
    first tokens (`enc(target)`) may be ones the model never sees after that prompt at
    inference (a SentencePiece tokenizer's dummy prefix "▁"). `socratic.formats` ends every
    prompt in a newline so that the pieces meet where byte-level BPEs (GPT-2, SmolLM2) cut
    anyway. The first line says whether the prompt's tokens are even a prefix of the joined
    text's (TRL's check); otherwise the pieces differ further on.
    """
    ends = []  # per example: (index of its first piece in `encoded`, number of pieces)
    at = 0
    for ex in examples:
        n = len(ex.pieces) if isinstance(ex, SolverSequence) else 2
        ends.append((at, n))
        at += n
    picked = list(zip(examples, ends, strict=True))[:limit]
    if not picked:
        return []
    joined = [
        "".join(ex.pieces) if isinstance(ex, SolverSequence) else ex.prompt + ex.target
        for ex, _ in picked
    ]
    together = tokenizer(joined, add_special_tokens=False)["input_ids"]
    problems = []
    for (_, (start, n)), text, whole in zip(picked, joined, together, strict=True):
        pieces = [list(encoded[start + j]) for j in range(n)]
        apart = [t for p in pieces for t in p]
        if list(whole) == apart:
            continue
        prompt = pieces[0]
        if list(whole[: len(prompt)]) != prompt:
            what = "the prompt's tokens are not a prefix of the tokens of prompt + target"
        else:
            what = "prompt + target encoded as one text differ from the pieces encoded apart"
        common = zip(whole, apart, strict=False)  # may differ in length
        i = next((k for k, (a, b) in enumerate(common) if a != b), min(len(whole), len(apart)))
        show = tokenizer.convert_ids_to_tokens
        problems.append(
            f"{what}: {text[:60]!r}...: joined {show(list(whole[i : i + 3]))} "
            f"vs apart {show(apart[i : i + 3])} at token {i}"
        )
    if problems:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        warnings.warn(
            f"tokenizer {name}: {len(problems)} of the first {len(picked)} examples tokenise "
            f"differently apart than joined; e.g. {problems[0]}. Labels stay exact (pieces are "
            "encoded apart), but the student trains on token sequences that encoding the same "
            "text at inference does not give (packed solver contexts, a target's first tokens)",
            TokenBoundaryWarning,
            stacklevel=3,
        )
    return problems


class Piece(list):
    """Token ids of one encoded text, with `line_ends`: the indices right after each "\n"
    (`socratic.generate.token_line_ends`), where `bound_prompt` may cut a prompt, and `forced`:
    the indices of tokens the calculator forces at inference (`calculator_result_tokens`)."""

    def __init__(
        self, ids: Iterable[int] = (), line_ends: Sequence[int] = (), forced: Sequence[int] = ()
    ) -> None:
        super().__init__(ids)
        self.line_ends = list(line_ends)
        self.forced = list(forced)

    def __add__(self, other: list[int]) -> Piece:  # type: ignore[override]
        ends = getattr(other, "line_ends", ())
        forced = getattr(other, "forced", ())
        return Piece(
            [*self, *other],
            [*self.line_ends, *(len(self) + e for e in ends)],
            [*self.forced, *(len(self) + f for f in forced)],
        )

    def labels(self) -> list[int]:
        """The ids as loss labels, `IGNORE_INDEX` on forced tokens."""
        out = list(self)
        for i in self.forced:
            out[i] = IGNORE_INDEX
        return out


# `<<expr=` then the result and `>>`: what `CalculatorForcing` writes once a row wrote `<<expr=`.
_FORCED_RE = re.compile(r"<<[^<>=]*=([^<>]*>>)")


def calculator_result_tokens(text: str, offsets: Sequence[tuple[int, int]]) -> list[int]:
    """Indices of the tokens that start inside a calculator span's result (`>>` included)."""
    regions = [m.span(1) for m in _FORCED_RE.finditer(text)]
    if not regions:
        return []
    return [i for i, (a, b) in enumerate(offsets) if b > a and any(s <= a < e for s, e in regions)]


def _add_example(
    out: TokenizedSet, p: Piece, t: Piece, max_length: int, min_prompt_tokens: int
) -> None:
    """One prompt + target (EOS included), its prompt cut to fit (`bound_prompt`) or the pair
    dropped."""
    room = max_length - len(t)
    if len(p) > room:
        if room < min_prompt_tokens:
            out.dropped += 1
            return
        p, _ = bound_prompt(p, p.line_ends, room)
        out.truncated += 1
    _append(out, [*p, *t], [IGNORE_INDEX] * len(p) + t.labels())


def _append(out: TokenizedSet, ids: list[int], labels: list[int]) -> None:
    out.input_ids.append(ids)
    out.labels.append(labels)
    out.tokens += len(ids)
    out.target_tokens += sum(lab != IGNORE_INDEX for lab in labels)


def _add_packed(
    out: TokenizedSet,
    contexts: list[Piece],
    targets: list[Piece],
    eos: int,
    max_length: int,
    min_prompt_tokens: int,
) -> None:
    """One problem's answers as few sequences as fit in `max_length`, each answer in its context.

    A sequence starting at answer k begins with the whole k-th per-example prompt (problem and
    every earlier step), then takes answers k, k+1, ... while they fit; answer j's end gets EOS
    as label on the next context's first input token ("\n"), the last one a real EOS token. A
    too-long problem is thus cut into several sequences, each answer still with exactly its own
    context, rather than losing its last steps (which would teach the solver only early steps
    of long problems). An answer whose own example does not fit is handled as in the
    per-example form (prompt cut, or dropped), so both forms train on the same pairs.
    """
    prefixes, acc = [], Piece()  # prefixes[k]: the k-th per-example prompt's ids
    for c, t in zip(contexts, targets, strict=True):
        acc = acc + c
        prefixes.append(acc)
        acc = acc + t
    n, k, before = len(targets), 0, len(out.input_ids)
    out.examples += n
    while k < n:
        if len(prefixes[k]) + len(targets[k]) + 1 > max_length:
            _add_example(out, prefixes[k], targets[k] + [eos], max_length, min_prompt_tokens)
            k += 1
            continue
        ids = prefixes[k] + targets[k]
        labels = [IGNORE_INDEX] * len(prefixes[k]) + targets[k].labels()
        k += 1
        while k < n and len(ids) + len(contexts[k]) + len(targets[k]) + 1 <= max_length:
            c, t = contexts[k], targets[k]
            ids += c + t
            labels += [eos] + [IGNORE_INDEX] * (len(c) - 1) + t.labels()
            k += 1
        _append(out, [*ids, eos], [*labels, eos])
    out.split += len(out.input_ids) - before > 1


def _encode(tokenizer: Any, texts: list[str], forced: bool = False) -> list[Piece]:
    """Each text's ids and line ends (none from a slow tokenizer, which has no offsets: its
    over-long prompts then lose their start, `bound_prompt`'s last resort), and with `forced`
    its calculator-forced tokens."""
    if not texts:
        return []
    fast = getattr(tokenizer, "is_fast", False)
    if forced and not fast:
        raise ValueError("masking calculator results needs a fast tokenizer (token offsets)")
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=fast)
    offsets = enc["offset_mapping"] if fast else [()] * len(texts)
    return [
        Piece(
            ids,
            token_line_ends(text, offs) if fast else (),
            calculator_result_tokens(text, offs) if forced else (),
        )
        for text, ids, offs in zip(texts, enc["input_ids"], offsets, strict=True)
    ]


# --- batching ------------------------------------------------------------------------------------


def batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    group_by_length: bool = True,
) -> list[list[int]]:
    """One epoch's batches, as lists of indices into the set.

    Grouping (the idea of HF's `LengthGroupedSampler`): shuffle, sort by length inside windows
    of `batch_size * 50`, cut each window into batches, shuffle the batches. Examples in a batch
    then have similar lengths, so little compute goes to padding, while which examples meet and
    in what order still change every epoch. The order depends only on (seed, epoch), so every
    rank can compute it alone. The last, smaller batch is kept: no example is skipped.

    A window holds the same examples as the corresponding 50 batches of the ungrouped order (same
    shuffle), and each window is cut optimally, so grouping never pads more than not grouping
    with the same seed and epoch.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    rng = random.Random(seed + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    window = batch_size * MEGA_BATCH_FACTOR
    out = [
        b
        for start in range(0, len(order), window)
        for b in _cut_by_length(order[start : start + window], lengths, batch_size)
    ]
    rng.shuffle(out)
    return out


def _cut_by_length(window: list[int], lengths: Sequence[int], size: int) -> list[list[int]]:
    """Batches of `window` with the fewest padded tokens: sorted, then cut into runs.

    With equal batch sizes cutting the sorted list in order is optimal. The one short batch
    (last window only) goes where it pads least: beside the longest examples when they are rare
    (its few rows pay for the longest length), further down otherwise - a fixed place loses to
    plain shuffling on some small sets. At most 51 places are tried.
    """
    w = sorted(window, key=lambda i: -lengths[i])
    full, short = divmod(len(w), size)
    if not short:
        return [w[i : i + size] for i in range(0, len(w), size)]

    def padded(j: int) -> int:  # tokens with the short batch after j full batches
        cut = j * size + short
        head = sum(lengths[w[i]] for i in range(0, j * size, size))
        tail = sum(lengths[w[i]] for i in range(cut, len(w), size))
        return size * (head + tail) + short * lengths[w[j * size]]

    j = min(range(full + 1), key=padded)
    cut = j * size + short
    before = [w[i : i + size] for i in range(0, j * size, size)]
    after = [w[i : i + size] for i in range(cut, len(w), size)]
    return [*before, w[j * size : cut], *after]


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of pad tokens when each batch is right-padded to its longest sequence."""
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches if b)
    real = sum(lengths[i] for b in batches for i in b)
    return (padded - real) / padded if padded else 0.0


def shard(batches: Sequence[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """This rank's batches; every rank gets the same number.

    Each step all-reduces gradients across ranks, so a rank with one batch more would wait
    forever for the others. The batches are therefore cut to a multiple of `world_size` (at most
    `world_size - 1` batches, different ones each epoch since the order is reshuffled) and dealt
    out round-robin. With fewer batches than ranks (a tiny data set on a big cluster) batches are
    repeated instead, so every rank still has exactly one; those examples then count twice.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    n = len(batches)
    if n == 0:
        return []
    if n < world_size:
        return [list(batches[rank % n])]
    return [list(b) for b in batches[: n - n % world_size][rank::world_size]]


def collate(
    seqs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (-100 on padding) of one batch."""
    if not seqs:
        raise ValueError("cannot collate an empty batch")
    if pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set one (e.g. to EOS) before training")
    width = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(seqs):
        if len(ids) != len(labs):
            raise ValueError(f"sequence {row}: {len(ids)} input ids but {len(labs)} labels")
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, : len(labs)] = torch.tensor(labs, dtype=torch.long)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}



def train_position_ids(
    attention_mask: torch.Tensor,
    how: str,
    factor: float,
    limit: int | None = None,
    share: float = 1.0,
) -> torch.Tensor | None:
    """Position ids for one right-padded training batch, drawn so that a student meets the
    distances of sequences longer than any it trains on (None: the model's own 0, 1, 2, ...).

    Why: the from-scratch students answer the first step of a 5-6 operation `arith` problem
    right 51 % of the time, and 100 % when the same problem is cut to two sentences (the solver
    of the seed-0 default run): they fail on token distances they never saw, not on content.
    Scaling positions at inference alone (position interpolation) falls to 3-7 %. So the
    distances are varied in training (Ruoss et al. 2023, "Randomized positional encodings"),
    while inference keeps the plain positions, which stay within what was trained:
    - "random-gaps": each row's positions are a sorted random subset of
      [0, factor x its length), so gaps of 1 (the inference case) stay common;
    - "stretch": each row's positions are i x s, s uniform in [1, factor], rounded down.
    `share` of the rows (each drawn with that chance) get such positions, the rest the plain
    ones. `limit` (the model's position table, for absolute-position models) caps the range.
    """
    check_positions(how, factor, share)
    if how == "contiguous":
        return None
    rows, width = attention_mask.shape
    out = torch.zeros((rows, width), dtype=torch.long)
    for r in range(rows):
        n = int(attention_mask[r].sum())
        if n == 0:
            continue
        span = max(n, int(factor * n))
        if limit is not None:
            if n > limit:
                raise ValueError(f"a sequence of {n} tokens exceeds the model's {limit} positions")
            span = min(span, limit)
        if share < 1.0 and float(torch.rand(())) >= share:
            pos = torch.arange(n)
        elif how == "random-gaps":
            pos = torch.randperm(span)[:n].sort().values
        else:
            top = (span - 1) / max(n - 1, 1)  # the largest stretch that stays in range
            s = 1.0 + (min(factor, top) - 1.0) * float(torch.rand(()))
            pos = torch.floor(torch.arange(n, dtype=torch.float64) * s).long()
        out[r, :n] = pos
        # Right padding continues the row, so positions stay increasing (what packed-sequence
        # detection in some attention kernels reads); padding carries no loss either way.
        pads = pos[-1] + 1 + torch.arange(width - n)
        out[r, n:] = pads if limit is None else pads.clamp(max=limit - 1)
    return out


def absolute_positions(config: Any) -> int | None:
    """The size of a model's learned position table (GPT-2 and kin), which drawn position ids
    must stay under; None for rotary models (Llama, SmolLM2), which take any position."""
    if getattr(config, "rope_theta", None) is not None or getattr(config, "rope_parameters", None):
        return None
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
