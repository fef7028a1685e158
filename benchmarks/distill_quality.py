"""Distillation quality benchmark: every method's students trained on the same problems, scored.

    .venv/bin/python benchmarks/distill_quality.py --seed 0 --json outputs/bench/quality.json
    .venv/bin/python benchmarks/distill_quality.py --seeds 0,1,2       # mean and spread
    .venv/bin/python benchmarks/distill_quality.py --sweep             # the pair's levers
    .venv/bin/python benchmarks/distill_quality.py --sweep --levers 0,7 \
        --dataset-config n_train=2000          # decomposer: all at once vs one at a time
    python benchmarks/distill_quality.py --dataset gsm8k --base-model DIR --use-gpu   # real data
    python benchmarks/distill_quality.py --dataset custom --path mine_{split}.jsonl \
        --question-field q --answer-field a --steps-field steps --answer-kind number   # yours

The study itself is `pipelines/quality.py` (the demo's stage 6 runs it too, and `pipelines/`
never imports `benchmarks/`): what it trains, how budgets are counted, the recipe as measured
and the target lines are documented there.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.quality import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
