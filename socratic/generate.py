"""Batched text generation with a Hugging Face causal LM: the one `generate` every stage uses.

The Serve deployments, offline evaluation and the local teacher all turn a list of prompts into
a list of completions with the same model call, so a change in padding, stopping or decoding can
never make the served students differ from the evaluated ones. torch and transformers are
imported when a model is loaded, not when this module is, which keeps `socratic` importable
without them.

Prompts are left-padded into one batch (causal LMs continue from the right edge), decoding is
greedy unless a temperature is given, and every completion says how many tokens it took and why
it stopped, so callers can count tokens and tell a finished answer from a cut-off one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Completion:
    """One generated text, with its token counts and why it stopped (`stop` | `length`)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


def load_model(
    name_or_dir: str | Path, gguf_file: str | None = None, dtype: str = "float32"
) -> tuple[Any, Any]:
    """(tokenizer, model) from an HF dir or hub id, or from a GGUF file inside `name_or_dir`.

    The tokenizer pads on the left and falls back to EOS as its pad token (GPT-2 family and
    SmolLM2 have none); the model is in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_dir), **kw)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        str(name_or_dir), dtype=getattr(torch, dtype), **kw
    ).eval()
    return tokenizer, model


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF checkpoint into a plain HF dir, once, so later loads take 0.2 s not 14 s.

    transformers refuses to `save_pretrained` a GGUF-loaded model while it still carries the
    quantizer; the weights are already dequantised to fp32 on load, so dropping it is lossless."""
    gguf_path = Path(gguf_path)
    tokenizer, model = load_model(gguf_path.parent, gguf_file=gguf_path.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


class Generator:
    """A loaded model that completes batches of prompts.

    `gen(prompts)` returns texts (the `generate(prompts) -> texts` callable of the solving loop);
    `gen.complete(prompts, ...)` returns `Completion`s with token counts and finish reasons."""

    def __init__(
        self,
        model: str | Path,
        *,
        max_new_tokens: int = 128,
        gguf_file: str | None = None,
        dtype: str = "float32",
        num_threads: int | None = None,
        device: str | None = None,
    ) -> None:
        import torch

        if num_threads:
            torch.set_num_threads(num_threads)
        self.name = str(model)
        self.tokenizer, self.model = load_model(model, gguf_file=gguf_file, dtype=dtype)
        # A replica or actor given a GPU uses it; everything else stays on CPU.
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.max_new_tokens = max_new_tokens
        self.tokens_generated = 0

    def __call__(self, prompts: Sequence[str]) -> list[str]:
        return [c.text for c in self.complete(prompts)]

    def complete(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> list[Completion]:
        """Complete every prompt in one left-padded batch. `temperature` 0 is greedy; `stop`
        strings cut the text where they first appear (and count as finish reason `stop`)."""
        import torch

        if not prompts:
            return []
        limit = max_new_tokens or self.max_new_tokens
        tok = self.tokenizer
        batch = tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
        batch = batch.to(self.device)
        sampling: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p}
            if seed is not None:
                torch.manual_seed(seed)
        if stop:  # stop generating once every row has hit one (the text is cut below)
            sampling["stopping_criteria"] = _stop_on_text(tok, stop, batch["input_ids"].shape[1])
        with torch.no_grad():
            out = self.model.generate(
                **batch, max_new_tokens=limit, pad_token_id=tok.pad_token_id, **sampling
            )
        new = out[:, batch["input_ids"].shape[1] :]
        prompt_lengths = batch["attention_mask"].sum(dim=1).tolist()
        # A row ends at its EOS (counted, as OpenAI counts it); a row stopped by a stop string
        # while others went on is filled with pad after it (not counted).
        eos = _eos_ids(tok, self.model)
        completions = []
        for row, n_prompt in zip(new.tolist(), prompt_lengths, strict=True):
            n, finished = len(row), False
            for i, t in enumerate(row):
                if t in eos or t == tok.pad_token_id:
                    n, finished = i + (t in eos), True
                    break
            text = tok.decode(row[:n], skip_special_tokens=True)
            cut = min((i for s in stop if (i := text.find(s)) >= 0), default=-1)
            if cut >= 0:
                text, finished = text[:cut], True
            completions.append(Completion(text, int(n_prompt), n, "stop" if finished else "length"))
        self.tokens_generated += sum(c.completion_tokens for c in completions)
        return completions


def _stop_on_text(tokenizer: Any, stop: Sequence[str], prompt_len: int) -> Any:
    """A stopping criterion that looks for the stop strings in the generated text only.

    transformers' own `stop_strings` also match across the prompt's last tokens, which would end
    a completion on a "stop string" it never wrote (OpenAI matches completions only)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    window = 4 * max(len(s) for s in stop) + 4  # tokens; a byte-level token holds >= 1 byte

    class StopOnText(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            tails = tokenizer.batch_decode(
                input_ids[:, prompt_len:][:, -window:], skip_special_tokens=True
            )
            done = [any(s in t for s in stop) for t in tails]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopOnText()])


def _eos_ids(tokenizer: Any, model: Any) -> set[int]:
    """Every id that ends a generation: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return {i for i in ids if i is not None}
