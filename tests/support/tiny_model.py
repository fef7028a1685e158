"""The tests' tiny causal LM, built on the spot: no model hub on these machines.

`trainers.scratch.build_student` at test size: a 2-layer GPT-2 and a byte-level BPE tokenizer
trained on the given texts (600 tokens, digits not split: the expected outputs in the tests were
recorded with it), saved as a plain Hugging Face directory, so every code path that takes "a
model id or dir" (training, export, serving) runs exactly as with `gpt2`.

Run `python -m tests.support.tiny_model OUT_DIR` to build one by hand.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from trainers import scratch
from trainers.scratch import EOS, PAD, sample_texts

__all__ = ["EOS", "PAD", "build_tiny_model", "build_tokenizer", "sample_texts"]
VOCAB_SIZE = 600


def build_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> Any:
    return scratch.build_tokenizer(texts, vocab_size, split_digits=False)


def build_tiny_model(
    out_dir: str | Path,
    texts: Iterable[str],
    seed: int = 0,
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 2,
    n_positions: int = 512,
) -> Path:
    """Save a tiny GPT-2 + tokenizer under `out_dir`; `from_pretrained(out_dir)` loads both."""
    return scratch.build_student(
        out_dir, texts, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
        seed=seed, arch="gpt2", vocab_size=VOCAB_SIZE, split_digits=False,
    )  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.support.tiny_model OUT_DIR")
    print(build_tiny_model(sys.argv[1], sample_texts()))
