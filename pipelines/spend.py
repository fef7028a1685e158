"""What an annotation run will spend (calls, tokens, USD) before it calls anything.

The estimate is printed before the first call and `--max-cost-usd` refuses a run above it; a
first wave (`--estimate-wave`) replaces the `--max-tokens` bound with the replies' real mean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.annotate_config import AnnotateConfig
from pipelines.keys import KeySet
from pipelines.output import column_sum
from pipelines.teacher_client import Prices
from pipelines.work_items import iter_work_items
from socratic.adapters import DatasetSpec, load_problems


def token_counter(model: str) -> tuple[Callable[[Sequence[Mapping[str, str]]], int], str]:
    """A prompt-token counter for `model` and what it is: tiktoken where it can, else 4 chars.

    tiktoken fetches its encoding files from the internet on first use, so offline (and for a
    model it does not know) the count falls back to an approximation, and says so.
    """
    try:
        import tiktoken

        enc = tiktoken.encoding_for_model(model)
        enc.encode("warm-up")
    except ImportError:
        why = "tiktoken is not installed"
    except KeyError:
        why = f"tiktoken has no encoding for model {model!r}"
    except Exception as e:  # noqa: BLE001 - offline: a network error of any kind
        why = f"tiktoken could not load its encoding ({type(e).__name__}; offline?)"
    else:
        # OpenAI's chat format: ~4 tokens of framing per message, 3 to prime the reply.
        return (
            lambda msgs: sum(len(enc.encode(m["content"])) + 4 for m in msgs) + 3,
            f"tiktoken {enc.name}",
        )
    return (
        lambda msgs: round(sum(len(m["content"]) / 4 + 4 for m in msgs) + 3),
        f"approximation, 4 characters per token: {why}",
    )


def estimate_spend(cfg: AnnotateConfig, done: KeySet) -> dict[str, Any]:
    """Calls, tokens and USD this run would spend, from one lazy pass over the problems."""
    count, tokenizer = token_counter(cfg.model)
    calls = prompt_tokens = 0
    last_id, last_tokens = None, 0
    spec = DatasetSpec.from_config(cfg)
    for item, messages in iter_work_items(cfg, load_problems(spec)):
        if item["cache_key"] in done:
            continue
        if item["id"] != last_id:  # samples of one problem share their prompt
            last_id, last_tokens = item["id"], count(messages)
        calls += 1
        prompt_tokens += last_tokens
    completion_tokens = calls * cfg.max_tokens
    cost = None
    if cfg.priced:
        cost = cfg.prices.cost(prompt_tokens, completion_tokens) * cfg.price_factor
    return {
        "calls": calls,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_by": tokenizer,
        "completion_tokens_by": f"--max-tokens {cfg.max_tokens} per call (an upper bound)",
        "cost_usd": None if cost is None else round(cost, 6),
        "pricing": f"Batch API price, x{cfg.batch_discount:g}" if cfg.batch_api else None,
    }


def wave_size(cfg: AnnotateConfig, estimate: dict[str, Any]) -> int:
    """Calls of the first wave (`--estimate-wave`): 0 when there is none, i.e. in gold or Batch
    API mode (a batch's answers come hours later, all at once) or when the wave would be all."""
    if cfg.mode != "teacher" or cfg.batch_api or cfg.estimate_wave <= 0:
        return 0
    return cfg.estimate_wave if estimate["calls"] > cfg.estimate_wave else 0


def revise_estimate(
    cfg: AnnotateConfig, estimate: dict[str, Any], wave: pa.Table
) -> dict[str, Any]:
    """The estimate after a first wave: its rows' real usage and cost, and the rest's completion
    tokens at the wave's mean per answered call. The rest's prompt tokens are the estimate's
    count pro rata (`estimate_spend` counted them for all calls, the wave's among them)."""
    answered = wave.filter(pc.greater(wave["completion_tokens"], 0))
    calls = wave.num_rows
    rest = max(estimate["calls"] - calls, 0)
    mean = (
        column_sum(answered["completion_tokens"]) / answered.num_rows if answered.num_rows else None
    )
    prompt_rest = round(estimate["prompt_tokens"] * rest / max(estimate["calls"], 1))
    completion_rest = rest * cfg.max_tokens if mean is None else round(rest * mean)
    out = {
        "wave_calls": calls,
        "wave_answered": answered.num_rows,
        "wave_prompt_tokens": column_sum(wave["prompt_tokens"]),
        "wave_completion_tokens": column_sum(wave["completion_tokens"]),
        "mean_completion_tokens": None if mean is None else round(mean, 1),
        "rest_calls": rest,
        "rest_prompt_tokens": prompt_rest,
        "rest_completion_tokens": completion_rest,
        "cost_usd": None,
    }
    if cfg.priced:
        wave_cost = cfg.prices.cost(out["wave_prompt_tokens"], out["wave_completion_tokens"])
        rest_cost = cfg.prices.cost(prompt_rest, completion_rest)
        out["wave_cost_usd"] = round(wave_cost * cfg.price_factor, 6)
        out["cost_usd"] = round((wave_cost + rest_cost) * cfg.price_factor, 6)
    return out


def format_revised(r: dict[str, Any]) -> str:
    cost = "" if r["cost_usd"] is None else f": ${r['cost_usd']:.4f} in all"
    mean = r["mean_completion_tokens"]
    per = (
        "no call answered, so still the --max-tokens bound"
        if mean is None
        else f"mean {mean:g} completion tokens per answered call"
    )
    return (
        f"estimate after a first wave of {r['wave_calls']} calls ({per}): "
        f"{r['rest_calls']} calls left, {r['rest_prompt_tokens']} prompt + "
        f"{r['rest_completion_tokens']} completion tokens{cost}"
    )


def format_estimate(e: dict[str, Any]) -> str:
    cost = "no --price-in/--price-out given" if e["cost_usd"] is None else f"${e['cost_usd']:.4f}"
    if e["cost_usd"] is not None and e.get("pricing"):
        cost += f" ({e['pricing']})"
    return (
        f"estimate: {e['calls']} teacher calls, {e['prompt_tokens']} prompt tokens "
        f"({e['prompt_tokens_by']}) + at most {e['completion_tokens']} completion tokens "
        f"({e['completion_tokens_by']}): {cost}"
    )


class SpendRefused(RuntimeError):
    """The estimate is above `--max-cost-usd`: nothing was called."""


def cost_of(fs: pafs.FileSystem, files: Iterable[str], prices: Prices) -> float:
    cost = 0.0
    for path in files:
        t = pq.read_table(path, filesystem=fs, columns=["prompt_tokens", "completion_tokens"])
        cost += prices.cost(
            pc.sum(t["prompt_tokens"]).as_py() or 0, pc.sum(t["completion_tokens"]).as_py() or 0
        )
    return cost
