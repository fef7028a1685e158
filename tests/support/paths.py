"""Where the real datasets live for tests and benchmarks (never copied into the repo)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def shared_data() -> Path:
    """`../shared/data` beside the checkout, or `$SOCRATIC_SHARED_DATA`."""
    return Path(os.environ.get("SOCRATIC_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_file(relative: str) -> Path | None:
    """A file under the shared data folder, or None when it is absent (tests then skip)."""
    path = shared_data() / relative
    return path if path.is_file() else None


def require_shared(relative: str) -> Path:
    """The real dataset file, or skip the calling test cleanly when it is absent."""
    import pytest

    path = shared_file(relative)
    if path is None:
        pytest.skip(f"{shared_data() / relative} not present")
    return path
