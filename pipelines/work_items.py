"""The annotation job's work items: one (row, chat messages) per problem and sample, lazily.

Each item carries its cache key (everything that shapes the teacher call), so the online path,
the Batch API and the spend estimate ask for the same calls, and resume skips the same ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from pipelines.annotate_config import GOLD_TEACHER, AnnotateConfig
from pipelines.keys import KeySet
from pipelines.prompting import Prompt, cache_key
from socratic.records import Problem


def iter_work_items(
    cfg: AnnotateConfig, problems: Iterable[Problem]
) -> Iterator[tuple[dict[str, Any], list[dict[str, str]]]]:
    """(row to compute, its chat messages) per (problem, sample), lazily, samples together."""
    prompts: dict[str, Prompt] = {}
    for p in problems:
        messages: list[dict[str, str]] = []
        if cfg.mode == "gold":
            model, sampling, version = GOLD_TEACHER, {}, GOLD_TEACHER
        else:
            if p.answer_kind not in prompts:  # parse each prompt file once, not per row
                prompts[p.answer_kind] = cfg.prompt_for(p.answer_kind)
            prompt = prompts[p.answer_kind]
            messages = prompt.messages(p, cfg.with_gold_solution)
            model, sampling, version = cfg.model, cfg.sampling, prompt.version
        row = p.to_dict()
        row["gold_steps"] = row.pop("steps")
        for sample in range(cfg.samples):
            key = cache_key(
                model=model,
                messages=messages,
                sampling=sampling,
                prompt_version=version,
                problem_id=p.id,
                sample=sample,
            )
            yield {**row, "sample": sample, "cache_key": key}, messages


def todo_items(
    items: Iterable[tuple[dict[str, Any], list[dict[str, str]]]],
    done: KeySet,
    pending: KeySet,
    keys: KeySet,
) -> Iterator[tuple[dict[str, Any], list[dict[str, str]]]]:
    """`--batch-api`: (row, messages) not yet answered nor in a batch still to collect, lazily.

    Every item's key goes to `keys` (this run's expected rows). A pending key (in an earlier
    run's batch) is expected from this run, which collects it.
    """
    for item, messages in items:
        keys.add(item["cache_key"])
        if item["cache_key"] in done:
            continue
        if item["cache_key"] not in pending:
            yield item, messages


def first_wave(chunks: Iterable[list[dict[str, Any]]], n: int) -> Iterator[list[dict[str, Any]]]:
    """The first `n` rows as a chunk of their own (`--estimate-wave`), then the rest as before."""
    it = iter(chunks)
    first = next(it, None)
    if first is None:
        return
    yield first[:n]
    if first[n:]:
        yield first[n:]
    yield from it


def todo_chunks(
    items: Iterable[tuple[dict[str, Any], Any]],
    done: KeySet,
    chunk_rows: int,
    keys: KeySet,
) -> Iterator[list[dict[str, Any]]]:
    """Rows not yet answered, in chunks of about `chunk_rows` that never split a problem.

    Every item's key goes to `keys` (this run's expected rows)."""
    chunk: list[dict[str, Any]] = []
    for item, _ in items:
        keys.add(item["cache_key"])
        if item["cache_key"] in done:
            continue
        if len(chunk) >= chunk_rows and item["sample"] == 0:
            yield chunk
            chunk = []
        chunk.append(item)
    if chunk:
        yield chunk
