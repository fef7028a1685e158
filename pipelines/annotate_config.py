"""The annotation job's configuration: every flag of `pipelines/annotate.py`, checked at parse.

Its own module because every part of the job reads it: the driver, the teacher-calling actors
(which Ray hands a copy), the Batch API and the summary.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from pipelines.journal import absolute
from pipelines.prompting import STEP_CHECKS, STYLES, Prompt
from pipelines.teacher_client import Prices
from socratic.adapters import DATASETS, DatasetOptions, DatasetSpec, is_local_path
from socratic.config import option

# The `teacher` (and `prompt_version`) of `--mode gold` rows: the dataset's own steps.
GOLD_TEACHER = "gold"


@dataclass(frozen=True)
class AnnotateConfig(DatasetOptions):
    """Annotate a dataset with Socratic (or CoT) teacher decompositions into Parquet."""

    dataset: str = option(
        help="dataset family (custom: your own, see --question-field ...)", choices=DATASETS
    )
    output: str = option(help="output folder: local path or a pyarrow filesystem URI (s3://...)")
    split: str = option("train", help="split to annotate")
    path: str | None = option(
        None,
        help="local dataset file (jsonl/json/csv/parquet) instead of the hub; custom: a file "
        "({split} is replaced by the split) or a hub dataset id",
    )
    dataset_config: str | None = option(None, help="GSM8K config: main or socratic")
    hub_id: str | None = option(None, help="hub dataset id, overriding the dataset's default")
    limit: int | None = option(None, help="annotate only the first N problems")
    mode: str = option(
        "teacher",
        help="teacher: call the teacher; gold: the dataset's own steps",
        choices=("teacher", "gold"),
    )
    model: str = option("gpt-4o-mini", help="teacher model name")
    base_url: str | None = option(None, help="OpenAI-compatible endpoint (default: OpenAI)")
    api_key_env: str = option("OPENAI_API_KEY", help="environment variable holding the API key")
    style: str = option("socratic", help="what the teacher writes", choices=STYLES)
    prompt: str | None = option(
        None, help="prompt YAML file (default: bundled, per style and answer kind)"
    )
    samples: int = option(1, help="teacher samples per problem")
    temperature: float = option(0.0, help="sampling temperature (raise it with --samples > 1)")
    max_tokens: int = option(512, help="max completion tokens per call")
    with_gold_solution: bool = option(
        True, help="show the teacher the gold solution, where the dataset has one"
    )
    max_in_flight: int = option(
        32,
        help="teacher requests in flight per actor; until a first reply proves the key and model "
        "right, per run (so a wrong key costs at most this many calls)",
    )
    http_client: str = option(
        "aiohttp",
        help="aiohttp: the OpenAI protocol over plain aiohttp, 6-10x less CPU per call than the "
        "openai client (the one that keeps up with thousands of calls in flight on 2 cores); "
        "openai: the openai package's AsyncOpenAI",
        choices=("aiohttp", "openai"),
    )
    actors: int = option(1, help="teacher-calling actors (one async actor is fastest for I/O)")
    actor_cpus: float = option(
        0.25, help="CPUs reserved per actor; leave a CPU for read/write tasks"
    )
    rpm: float | None = option(None, help="requests per minute limit (whole job)")
    tpm: float | None = option(None, help="tokens per minute limit (whole job)")
    timeout: float = option(60.0, help="seconds per teacher request")
    max_retries: int = option(
        6, help="retries of a transient failure (429, 5xx, timeout, connection)"
    )
    retry_base: float = option(1.0, help="first backoff in seconds; doubles per retry, full jitter")
    price_in: float | None = option(None, help="USD per 1M prompt tokens, for the cost line")
    price_out: float | None = option(None, help="USD per 1M completion tokens, for the cost line")
    max_cost_usd: float | None = option(
        None,
        help="refuse to start when the estimate is above this, and, per run across all actors, "
        "start a call only while the real spend so far, the calls in flight at their bound "
        "(prompt bytes + --max-tokens) and its own bound fit (needs --price-in/--price-out); a "
        "rerun resumes. With "
        "--batch-api: stop submitting new batches once the estimated cost of the submitted ones "
        "would pass it (a batch cannot be stopped part-way)",
    )
    dry_run: bool = option(False, help="print the spend estimate and exit, calling nothing")
    estimate_wave: int = option(
        0,
        help="send the first N calls as a wave, then estimate the rest's completion tokens from "
        "their real mean instead of the --max-tokens bound; --max-cost-usd then refuses the "
        "wave's bound up front and stops after the wave if the revised estimate is above it "
        "(online calls only; 0: the bound)",
    )
    step_check: str = option(
        "reject",
        help="re-evaluate every <<expr=value>> of the teacher's steps: reject a row with a wrong "
        "one (wrong_step), repair it (step_check=repaired) or off",
        choices=STEP_CHECKS,
    )
    chunk_rows: int = option(
        20_000,
        help="problem-samples per Ray Data run: the driver holds one chunk, never the dataset",
    )
    batch_api: bool = option(
        False,
        help="send the requests through the OpenAI Batch API (JSONL upload, batches, polling; "
        "--batch-discount of the price, answers within --batch-window) instead of online calls. "
        "Batch ids are recorded under <output>/_batches/: a rerun collects batches still running "
        "instead of paying twice",
    )
    batch_poll_s: float = option(30.0, help="--batch-api: seconds between polls of the batches")
    batch_max_requests: int = option(
        50_000, help="--batch-api: requests per batch at most (OpenAI's limit: 50,000)"
    )
    batch_max_bytes: int = option(
        190_000_000, help="--batch-api: bytes of JSONL per batch at most (OpenAI's limit: 200 MB)"
    )
    batch_discount: float = option(
        0.5, help="--batch-api: its price as a share of the online price (OpenAI: half)"
    )
    batch_window: str = option("24h", help="--batch-api: completion window", choices=("24h",))
    batch_max_wait_s: float | None = option(
        None,
        help="--batch-api: stop waiting after this many seconds; the batches keep running at the "
        "provider and a rerun into the same output collects them",
    )
    batch_max_rounds: int = option(
        3,
        help="--batch-api: times a request left unanswered (expired or failed batch, lost output "
        "file) is submitted in all within one run",
    )
    batch_max_active: int | None = option(
        None,
        help="--batch-api: batches in progress at once at most (providers limit the tokens "
        "enqueued per model); default: no limit",
    )
    batch_keep_files: bool = option(
        False,
        help="--batch-api: keep each collected batch's requests and result files, under "
        "<output>/_batches/ and at the provider (default: delete both once its rows are in "
        "Parquet; records stay)",
    )
    address: str | None = option(None, help="Ray address (default: RAY_ADDRESS or a local cluster)")
    seed: int = option(0, help="seed for retry jitter and seeded dataset splits")
    force_unlock: bool = option(
        False,
        help="take over the output's lock (<output>/_run.lock) held by a run on another host, "
        "which cannot be checked from here: only when that run is certainly gone. A run on this "
        "host is checked: a dead one's lock is taken over anyway, a live one's never",
    )

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError("--samples must be at least 1")
        if self.mode == "gold" and self.samples != 1:
            raise ValueError("--mode gold writes one row per problem; leave --samples at 1")
        if self.max_in_flight < 1 or self.actors < 1:
            raise ValueError("--max-in-flight and --actors must be at least 1")
        if self.chunk_rows < 1:
            raise ValueError("--chunk-rows must be at least 1")
        if self.max_cost_usd is not None and self.price_in is None and self.price_out is None:
            raise ValueError("--max-cost-usd needs --price-in and/or --price-out to count spend")
        if self.batch_api and self.mode != "teacher":
            raise ValueError("--batch-api sends teacher requests; it needs --mode teacher")
        if self.batch_max_requests < 1 or self.batch_max_bytes < 1 or self.batch_max_rounds < 1:
            raise ValueError("--batch-max-requests, --batch-max-bytes, --batch-max-rounds: >= 1")
        if self.batch_poll_s <= 0 or not 0 < self.batch_discount <= 1:
            raise ValueError("--batch-poll-s must be > 0 and --batch-discount within (0, 1]")
        if self.batch_max_active is not None and self.batch_max_active < 1:
            raise ValueError("--batch-max-active must be at least 1")
        if self.estimate_wave < 0:
            raise ValueError("--estimate-wave must be 0 (off) or a number of calls")
        DatasetSpec.from_config(self)  # the dataset options checked now, not after the estimate

    def with_absolute_paths(self) -> AnnotateConfig:
        """Local paths (`--output`, `--path`, `--prompt`) made absolute against the driver's
        working dir; URIs as they are. The actors get this config: a relative path would be
        resolved in a Ray worker's own working dir (under `ray job submit --working-dir`, or on
        another node, not the driver's), so the journal would land elsewhere and the kill -9
        resume would silently find nothing."""
        return replace(
            self,
            output=absolute(self.output),
            path=absolute(self.path)
            if self.path and is_local_path(self.dataset, self.path)
            else self.path,
            prompt=absolute(self.prompt) if self.prompt else self.prompt,
        )

    @property
    def prices(self) -> Prices:
        return Prices(self.price_in or 0.0, self.price_out or 0.0)

    @property
    def priced(self) -> bool:
        return self.price_in is not None or self.price_out is not None

    @property
    def price_factor(self) -> float:
        """What the endpoint charges of the --price-in/--price-out prices: the Batch API less."""
        return self.batch_discount if self.batch_api else 1.0

    @property
    def sampling(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "max_tokens": self.max_tokens}

    def prompt_for(self, answer_kind: str) -> Prompt:
        """The prompt for a problem of `answer_kind`; a custom dataset's stated kind wins, so a
        row that lost its kind on the way (the Batch API's item files) still gets its own."""
        if self.prompt:
            return Prompt.load(self.prompt)
        return Prompt.default(self.style, self.answer_kind or answer_kind)
