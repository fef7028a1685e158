"""Batched text generation with a Hugging Face causal LM: the one `generate` every stage uses.

The Serve deployments, offline evaluation and the local teacher all turn a list of prompts into
a list of completions with the same model call, so a change in padding, stopping or decoding can
never make the served students differ from the evaluated ones. torch and transformers are
imported when a model is loaded, not when this module is, which keeps `socratic` importable
without them.

Prompts are left-padded into one batch (causal LMs continue from the right edge), decoding is
greedy unless a temperature is given, and every completion says how many tokens it took and why
it stopped, so callers can count tokens and tell a finished answer from a cut-off one.

Two things happen inside that one `generate`:

* **The calculator** (`calculator=True`, as in the GSM8K paper's Appendix C): a row that has just
  written `<<expr=` gets the calculator's result and `>>` forced as its next tokens, by a logits
  processor that masks every other token. Each row keeps its own state, so rows that reach `=`
  at different steps of one batch are each served when they get there. See `CalculatorForcing`.
* **Bounds**: prompt + `max_new_tokens` never exceed the model's positions (past them GPT-2 fails
  with "index out of range in self"). See `bound_prompt`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from socratic.calculator import CalculatorError, evaluate, format_number

log = logging.getLogger(__name__)

DTYPES = {"auto": None, "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32",
                  "float": "fp32"}  # fmt: skip
# A tokenizer's model_max_length above this is transformers' "no limit" placeholder (1e30).
_SANE_MAX_LENGTH = 10**6
# Every prompt keeps at least this share of the positions; max_new_tokens is cut to the rest.
MIN_PROMPT_SHARE = 4  # 1/4
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Completion:
    """One generated text, with its token counts and why it stopped (`stop` | `length`).

    `truncated`: the prompt lost tokens to fit the model's positions (see `bound_prompt`).
    `calculator`: the text was decoded with the calculator inside decoding; then
    `calculator_forced` spans got their result forced and `calculator_refused` were left to the
    model (their reasons in `calculator_errors`)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    truncated: bool = False
    calculator: bool = False
    calculator_forced: int = 0
    calculator_refused: int = 0
    calculator_errors: tuple[str, ...] = ()


def resolve_dtype(dtype: str | None, device: str) -> Any:
    """The torch dtype for `dtype` ("auto" | "bf16" | "fp16" | "fp32", or torch's own names).

    "auto" is bf16 on a GPU (fp16 where the GPU has no bf16) and fp32 on CPU, where bf16 matmuls
    are slower than fp32 on most CPUs and tiny students are cheap anyway."""
    import torch

    key = _DTYPE_ALIASES.get(dtype or "auto", dtype or "auto")
    if key not in DTYPES:
        choices = ", ".join(DTYPES)
        raise ValueError(f"dtype {dtype!r} is not one of {choices} (or bfloat16/float16/float32)")
    if key == "auto":
        if not str(device).startswith("cuda"):
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, DTYPES[key])


def default_device() -> str:
    """A GPU when this process can see one (a replica or actor given `num_gpus`), else CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    name_or_dir: str | Path,
    gguf_file: str | None = None,
    dtype: str = "auto",
    device: str | None = None,
) -> tuple[Any, Any]:
    """(tokenizer, model) from an HF dir or hub id, or from a GGUF file inside `name_or_dir`.

    The tokenizer pads on the left and falls back to EOS as its pad token (GPT-2 family and
    SmolLM2 have none); the model is in eval mode, on `device` (default: a GPU if visible) in
    `dtype` (see `resolve_dtype`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or default_device()
    kw: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_dir), **kw)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        str(name_or_dir), dtype=resolve_dtype(dtype, device), **kw
    )
    return tokenizer, model.to(device).eval()


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF checkpoint into a plain HF dir, once, so later loads take 0.2 s not 14 s.

    transformers refuses to `save_pretrained` a GGUF-loaded model while it still carries the
    quantizer; the weights are already dequantised to fp32 on load, so dropping it is lossless."""
    gguf_path = Path(gguf_path)
    tokenizer, model = load_model(
        gguf_path.parent, gguf_file=gguf_path.name, dtype="fp32", device="cpu"
    )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def context_limit(model: Any, tokenizer: Any = None) -> int | None:
    """Positions the model can attend to: its config's, and the tokenizer's when it sets a real
    one (transformers writes 1e30 for "none"); the smaller wins. None: no known bound."""
    config = model.config
    limits = [
        v
        for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")
        if isinstance(v := getattr(config, name, None), int) and v > 0
    ]
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < _SANE_MAX_LENGTH:
        limits.append(tok_max)
    return min(limits) if limits else None


def generation_budget(max_new_tokens: int, positions: int | None) -> int:
    """Tokens a call may generate: `max_new_tokens`, cut so that a prompt keeps at least
    1/MIN_PROMPT_SHARE of the positions. It depends on the model only, never on the other
    prompts of a batch, so batching cannot change a row's result."""
    if positions is None:
        return max_new_tokens
    return max(1, min(max_new_tokens, positions - positions // MIN_PROMPT_SHARE))


def token_line_ends(text: str, offsets: Sequence[tuple[int, int]]) -> list[int]:
    """Token indices right after each line break of `text`, from a fast tokenizer's offsets:
    the `line_ends` that `bound_prompt` cuts at."""
    return [k + 1 for k, (_, end) in enumerate(offsets) if text[end - 1 : end] == "\n"]


def bound_prompt(ids: Sequence[int], line_ends: Sequence[int], room: int) -> tuple[list[int], bool]:
    """A prompt's token ids cut to at most `room`, and whether anything was cut.

    `line_ends` are the token indices right after each line break (0 < i < len(ids)), so
    `ids[:line_ends[0]]` is the problem line, the first line of every prompt in
    `socratic.formats`. The cut, in order of preference:

    1. it fits: unchanged;
    2. the problem line and the last line (the sub-question or header being answered) fit
       together: keep the problem line and as many whole lines from the end as fit, dropping
       the oldest steps between them;
    3. otherwise (the problem line alone is too long, e.g. pasted garbage): keep the last `room`
       tokens: the end of the problem, where its question is, and the last line survive.

    Training cuts its prompts with this same rule (`trainers/data.py` `tokenize`), so a student
    is served the context it was trained on.
    """
    ids = list(ids)
    if len(ids) <= room:
        return ids, False
    cuts = [i for i in line_ends if 0 < i < len(ids)]
    if cuts:
        head = cuts[0]
        for j in cuts:
            if head + len(ids) - j <= room:
                return ids[:head] + ids[j:], True
    return ids[len(ids) - room :], True


def _per_row(limit: int | Sequence[int], n: int) -> list[int]:
    return [limit] * n if isinstance(limit, int) else list(limit)


def fitting_groups(
    lengths: Sequence[int], limits: Sequence[int], positions: int | None
) -> list[list[int]]:
    """Row indices in groups whose padded batch fits the positions: in each, the longest prompt
    plus the largest limit is at most `positions` (left padding makes every row as long as the
    longest, and a row that stopped early still advances its positions). One group, in order,
    when everything fits (the usual case); else rows by limit, largest first, each group filled
    while it fits. Every row fits alone, since `encode` bounded it by its own limit."""
    rows = list(range(len(lengths)))
    if positions is None or max(lengths) + max(limits) <= positions:
        return [rows]
    groups: list[list[int]] = []
    longest = top = 0
    for b in sorted(rows, key=lambda r: (-limits[r], r)):
        if groups and max(longest, lengths[b]) + top <= positions:
            groups[-1].append(b)
            longest = max(longest, lengths[b])
        else:
            groups.append([b])
            longest, top = lengths[b], limits[b]
    return [sorted(g) for g in groups]


class Generator:
    """A loaded model that completes batches of prompts.

    `gen(prompts)` returns texts (the `generate(prompts) -> texts` callable of the solving loop);
    `gen.complete(prompts, ...)` returns `Completion`s with token counts and finish reasons.
    `device` defaults to a GPU when one is visible; `dtype` "auto" is bf16 there, fp32 on CPU."""

    def __init__(
        self,
        model: str | Path,
        *,
        max_new_tokens: int = 128,
        gguf_file: str | None = None,
        dtype: str = "auto",
        num_threads: int | None = None,
        device: str | None = None,
    ) -> None:
        import torch

        if num_threads:
            torch.set_num_threads(num_threads)
        self.name = str(model)
        self.device = device or default_device()
        self.tokenizer, self.model = load_model(
            model, gguf_file=gguf_file, dtype=dtype, device=self.device
        )
        self.dtype = self.model.dtype
        self.positions = context_limit(self.model, self.tokenizer)
        self.max_new_tokens = max_new_tokens
        self.tokens_generated = 0
        self._span_closers: dict[int, str] | None = None  # see _closers

    def __call__(self, prompts: Sequence[str], *, calculator: bool = False) -> list[str]:
        return [c.text for c in self.complete(prompts, calculator=calculator)]

    def encode(
        self, prompts: Sequence[str], max_new_tokens: int | Sequence[int]
    ) -> tuple[list[list[int]], list[bool]]:
        """Each prompt's token ids, bounded so that prompt + its own `max_new_tokens` (one for
        all, or one per prompt) fit the model's positions (`bound_prompt`), and whether it was
        cut. Lone surrogates (an escaped "\\ud800" in JSON) become U+FFFD first: the tokenizer
        cannot encode them."""
        tok = self.tokenizer
        texts = [_SURROGATE.sub("\ufffd", p) for p in prompts]
        enc = tok(texts, add_special_tokens=False, return_offsets_mapping=tok.is_fast)
        if self.positions is None:
            return [list(ids) for ids in enc["input_ids"]], [False] * len(texts)
        limits = _per_row(max_new_tokens, len(texts))
        out, cut = [], []
        for i, text in enumerate(texts):
            ids, room = enc["input_ids"][i], self.positions - limits[i]
            if len(ids) > room and tok.is_fast:
                line_ends = token_line_ends(text, enc["offset_mapping"][i])
            else:
                line_ends = []
            kept, was_cut = bound_prompt(ids, line_ends, room)
            out.append(kept)
            cut.append(was_cut)
        return out, cut

    def complete(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int | Sequence[int] | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        calculator: bool = False,
    ) -> list[Completion]:
        """Complete every prompt in one left-padded batch. `temperature` 0 is greedy; `stop`
        strings cut the text where they first appear (and count as finish reason `stop`);
        `calculator` forces the result of every `<<expr=` span (`CalculatorForcing`).

        `max_new_tokens` may be one limit per prompt: the batch then runs once, each row stops
        at its own limit, so requests that differ only in their limit still share a call (one
        `generate` per limit cost the local teacher a call per request under mixed limits).
        Each prompt is bounded by its own limit, never by the batch's largest (which cut a long
        prompt that shared a batch with a request for many tokens). Where the padded batch would
        then outrun the positions (the longest prompt + the largest limit), it runs as the
        fewest groups that fit (`fitting_groups`)."""
        if not prompts:
            return []
        if max_new_tokens is not None and not isinstance(max_new_tokens, int):
            asked = [int(k) for k in max_new_tokens]
            if len(asked) != len(prompts) or min(asked) < 1:
                raise ValueError("max_new_tokens: one limit >= 1 per prompt")
        else:
            asked = [max_new_tokens or self.max_new_tokens] * len(prompts)
        limits = [generation_budget(k, self.positions) for k in asked]
        if limits != asked:
            k = max(asked)
            log.warning("max_new_tokens %d cut to %d: the model has %d positions and a prompt "
                        "keeps at least 1/%d of them", k, generation_budget(k, self.positions),
                        self.positions, MIN_PROMPT_SHARE)  # fmt: skip
        ids, truncated = self.encode(prompts, limits)
        sampling = {"temperature": temperature, "top_p": top_p, "seed": seed, "stop": stop}
        out: list[Completion | None] = [None] * len(prompts)
        for group in fitting_groups([len(r) for r in ids], limits, self.positions):
            done = self._generate(
                [ids[b] for b in group], [limits[b] for b in group], calculator, **sampling
            )
            for b, c in zip(group, done, strict=True):
                out[b] = replace(c, truncated=truncated[b])
        completions = [c for c in out if c is not None]
        self.tokens_generated += sum(c.completion_tokens for c in completions)
        return completions

    def _generate(
        self,
        ids: list[list[int]],
        limits: list[int],
        calculator: bool,
        *,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop: Sequence[str],
    ) -> list[Completion]:
        """One `model.generate` over rows that fit together: each row stops at its own limit."""
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        tok = self.tokenizer
        batch = tok.pad({"input_ids": ids}, return_tensors="pt", padding=True)
        batch = batch.to(self.device)
        prompt_len = batch["input_ids"].shape[1]
        sampling: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p}
            if seed is not None:
                torch.manual_seed(seed)
        criteria = StoppingCriteriaList()
        stopped = None
        if stop:  # stop generating once every row has hit one (the text is cut below)
            stopped = _StopOnText(tok, stop, prompt_len)
            criteria.append(stopped)
        if min(limits) < max(limits):
            criteria.append(_stop_at_lengths(limits, prompt_len, self.device))
        if criteria:
            sampling["stopping_criteria"] = criteria
        eos = _eos_ids(tok, self.model)
        forcing = None
        if calculator:
            forcing = CalculatorForcing(tok, prompt_len, eos | {tok.pad_token_id}, self._closers())
            sampling["logits_processor"] = LogitsProcessorList([forcing])
        with torch.no_grad():
            out = self.model.generate(
                **batch, max_new_tokens=max(limits), pad_token_id=tok.pad_token_id, **sampling
            )
        new = out[:, prompt_len:]
        # A row ends at its EOS (counted, as OpenAI counts it); a row stopped by a stop string
        # or its limit while others went on is filled with pad after it (not counted, even
        # where pad is the EOS token).
        completions = []
        for b, row in enumerate(new.tolist()):
            row = row[: limits[b]]
            if stopped is not None and stopped.at[b] is not None:
                row = row[: stopped.at[b]]
            n, finished = len(row), False
            for i, t in enumerate(row):
                if t in eos or t == tok.pad_token_id:
                    n, finished = i + (t in eos), True
                    break
            text = tok.decode(row[:n], skip_special_tokens=True)
            cut = min((i for s in stop if (i := text.find(s)) >= 0), default=-1)
            if cut >= 0:
                text, finished = text[:cut], True
            calc: dict[str, Any] = {}
            if forcing is not None:
                calc = forcing.counts(b, n)
            completions.append(Completion(text, len(ids[b]), n, "stop" if finished else "length",
                                          **calc))  # fmt: skip
        return completions

    def _closers(self) -> dict[int, str]:
        """Every token whose text has a `=` followed by more text (`=-`, `==`, `)=-`), mapped to
        that text. Such a token closes an open `<<expr` span and writes past its `=` in one go;
        `CalculatorForcing` decides which of them a row may still write. Computed once per
        model (one decode per vocabulary entry)."""
        if self._span_closers is None:
            tok = self.tokenizer
            special = set(tok.all_special_ids)
            texts = ((i, tok.decode([i])) for i in range(len(tok)) if i not in special)
            self._span_closers = {i: t for i, t in texts if "=" in t[:-1]}
        return self._span_closers


# The last span of a row's text: `<<expr` (open), `<<expr=` or `<<expr=PART` (result due).
_LAST_SPAN = re.compile(r"<<([^<>=]*)(?:(=)([^<=]*))?$")


class CalculatorForcing:
    """A logits processor: the GSM8K paper's calculator, inside one batched `generate`.

    After every step it reads each row's newest text. When that text ends in `<<expr=` the
    expression goes to `socratic.calculator`; its result and `>>` become the row's queue of
    forced tokens, and on each following step every other token's score is -inf, so greedy and
    sampled decoding alike emit exactly that queue. Other rows are untouched: each row has its
    own queue and reaches its `=` whenever it does. An expression the calculator refuses is left
    to the model and counted, with its reason.

    Tokenisation. The forced ids are the tokenizer's encoding of `<<expr=` + result + `>>`,
    minus the tokens of `<<expr=`: what the model saw in training (byte-level BPE splits `=`
    from the digits after it, so this is the result's own encoding). Some tokenizers, GPT-2's
    and ours among them, merge `=` with punctuation after it (`=-` for a negative result):
    * the model may write such a token itself. While a span is open, a merged token is allowed
      only if what it writes after `=` agrees with the result of the expression so far (`=-`
      when the result is negative); the rest of the result is then forced after it. Any other
      token that writes past a `=` is banned inside a span, so the calculator always acts.
    * when the model wrote a plain `=`, the merge can no longer happen: the result is then
      encoded on its own after it (`-`, `5`, `>>`), which is also what `_encode_after` falls
      back to whenever a token of the joint encoding straddles the boundary.
    Text that still bypasses the calculator (a span cut by `max_new_tokens`, text from another
    generator) is fixed after the fact by the solving loop (`apply_calculator`), as a fallback.
    """

    def __init__(
        self, tokenizer: Any, prompt_len: int, stop_ids: set[int], closers: dict[int, str]
    ) -> None:
        self.tok = tokenizer
        self.prompt_len = prompt_len
        self.stop_ids = stop_ids
        self.closers = closers
        self.queue: dict[int, list[int]] = {}
        self.start: dict[int, int] = {}  # generated-token index where a row's unread text begins
        # (position of the first forced token | of the '=' refused, error or None) per row
        self.events: dict[int, list[tuple[int, str | None]]] = {}

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        generated = input_ids[:, self.prompt_len :]
        n = generated.shape[1]
        for b in range(generated.shape[0]):
            queue = self.queue.get(b)
            if queue:
                self._force(scores, b, queue.pop(0))
                continue
            if n and int(generated[b, -1]) in self.stop_ids:
                continue  # finished row: generate pads it from here on
            row = generated[b, self.start.get(b, 0) :].tolist()
            text = self.tok.decode(row, skip_special_tokens=True)
            m = _LAST_SPAN.search(text)
            if m is None:
                if not text.endswith("<"):
                    self.start[b] = n  # nothing pending: never decode this text again
                continue
            expr, eq, written = m.groups()
            try:
                value = format_number(evaluate(expr)) + ">>"
            except CalculatorError as e:
                if eq:  # the expression is closed: left to the model, counted once
                    self.start[b] = n
                    self.events.setdefault(b, []).append((n - 1, str(e)))
                continue
            if not eq:  # open span: only merged '=' tokens that agree with the result
                banned = [
                    i
                    for i, t in self.closers.items()
                    if not (t.startswith("=") and value.startswith(t[1:]))
                ]
                if banned:
                    scores[b, banned] = -float("inf")
                continue
            self.start[b] = n
            if not value.startswith(written):  # the model wrote past '=' (bypassed; see above)
                continue
            forced = self._encode_after(text[m.start() :], value[len(written) :])
            self.events.setdefault(b, []).append((n, None))
            if forced:
                self.queue[b] = forced[1:]
                self._force(scores, b, forced[0])
        return scores

    @staticmethod
    def _force(scores: Any, b: int, token: int) -> None:
        scores[b, :] = -float("inf")
        scores[b, token] = 0.0

    def _encode_after(self, context: str, forced: str) -> list[int]:
        """Token ids of `forced` as the tokenizer writes it after `context` (see the class)."""
        tok = self.tok
        if not forced:
            return []
        if tok.is_fast:
            enc = tok(context + forced, add_special_tokens=False, return_offsets_mapping=True)
            pairs = list(zip(enc["input_ids"], enc["offset_mapping"], strict=True))
            k = len(context)
            if not any(s < k < e for _, (s, e) in pairs):  # no token straddles the boundary
                ids = [i for i, (s, _) in pairs if s >= k]
                if ids and tok.decode(ids) == forced:
                    return ids
        return list(tok(forced, add_special_tokens=False)["input_ids"])

    def counts(self, b: int, n: int) -> dict[str, Any]:
        """Row b's Completion fields, counting only what happened in its first n tokens."""
        events = [(pos, err) for pos, err in self.events.get(b, []) if pos < n]
        errors = tuple(err for _, err in events if err is not None)
        return {
            "calculator": True,
            "calculator_forced": len(events) - len(errors),
            "calculator_refused": len(errors),
            "calculator_errors": errors,
        }


class _StopOnText:
    """A stopping criterion that looks for the stop strings in the generated text only, and
    records for each row how many tokens it had when one first appeared (`at`): after that the
    row is padding, which must not be counted as generated when pad is the EOS token.

    transformers' own `stop_strings` also match across the prompt's last tokens, which would end
    a completion on a "stop string" it never wrote (OpenAI matches completions only)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_len: int) -> None:
        self.tokenizer, self.stop, self.prompt_len = tokenizer, list(stop), prompt_len
        self.window = 4 * max(len(s) for s in stop) + 4  # tokens; one holds >= 1 byte
        self.at: list[int | None] = []

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        new = input_ids[:, self.prompt_len :]
        tails = self.tokenizer.batch_decode(new[:, -self.window :], skip_special_tokens=True)
        done = [any(s in t for s in self.stop) for t in tails]
        if not self.at:
            self.at = [None] * len(done)
        for b, d in enumerate(done):
            if d and self.at[b] is None:
                self.at[b] = new.shape[1]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _stop_at_lengths(limits: Sequence[int], prompt_len: int, device: Any) -> Any:
    """A stopping criterion that ends each row at its own number of new tokens; transformers
    marks a stopped row finished and pads it while the others go on."""
    import torch
    from transformers import StoppingCriteria

    bound = torch.tensor(list(limits), device=device)

    class StopAtLengths(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return (input_ids.shape[1] - prompt_len) >= bound

    return StopAtLengths()


def _eos_ids(tokenizer: Any, model: Any) -> set[int]:
    """Every id that ends a generation: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return {i for i in ids if i is not None}
