"""The request body, bounded and checked before anything parses it, and text a tokenizer takes.

The rule is structural: the body's type, size and nesting are checked before `json.loads` sees
it (a 100 000-level `[[[...]]]` made `json.loads` raise RecursionError, a 500), and every text
field goes through `check_text` before a tokenizer sees it (a lone surrogate `"\\ud800"` made the
tokenizer raise TypeError). Each failure is an `HTTPException` with a `detail` that says what
to send instead.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any

from fastapi import HTTPException, Request

MAX_BODY_BYTES = 16 * 1024
MAX_JSON_DEPTH = 8  # the API's own bodies are depth 1
_OPEN, _CLOSE, _QUOTE, _BACKSLASH = b"[{", b"]}", 0x22, 0x5C


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays/objects in `raw`, brackets inside strings not counted."""
    depth = best = 0
    in_str = escaped = False
    for b in raw:
        if in_str:
            if escaped:
                escaped = False
            elif b == _BACKSLASH:
                escaped = True
            elif b == _QUOTE:
                in_str = False
        elif b == _QUOTE:
            in_str = True
        elif b in _OPEN:
            depth += 1
            best = max(best, depth)
        elif b in _CLOSE:
            depth -= 1
    return best


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


async def read_json(
    request: Request, max_bytes: int = MAX_BODY_BYTES, max_depth: int = MAX_JSON_DEPTH
) -> Any:
    """The request's JSON body: 415 unless it says it is JSON, 413 past `max_bytes` (read no
    further than that), 400 when nested deeper than `max_depth` or not JSON at all."""
    ctype = request.headers.get("content-type", "")
    if not _is_json(ctype):
        raise HTTPException(
            415, f"Content-Type must be application/json, not {ctype or '(none)'!r}"
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise HTTPException(413, f"body is {declared} bytes; the limit is {max_bytes}")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_bytes:
            raise HTTPException(413, f"body is over {max_bytes} bytes; the limit is {max_bytes}")
    if json_depth(bytes(raw)) > max_depth:
        raise HTTPException(400, f"body is nested deeper than {max_depth} levels")
    try:
        return json.loads(bytes(raw))
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are both
        raise HTTPException(400, "body is not valid JSON") from None


def check_text(text: str, field: str) -> str:
    """`text` in NFC, refused (422) when a tokenizer cannot take it: unpaired surrogates,
    unassigned code points and noncharacters (U+10FFFF), private use, control characters other
    than tab and newline. Marks, joiners and bidi controls are valid text and stay; their token
    cost is bounded where prompts are tokenised."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise HTTPException(
            422,
            f"'{field}' contains an unpaired surrogate U+{ord(text[e.start]):04X} at "
            f"{e.start}: send valid Unicode",
        ) from None
    text = unicodedata.normalize("NFC", text)
    for i, ch in enumerate(text):
        cat = unicodedata.category(ch)
        if cat in ("Cn", "Co") or (cat == "Cc" and ch not in "\t\n\r"):
            what = "a control" if cat == "Cc" else "an unassigned or private-use"
            raise HTTPException(
                422, f"'{field}' contains U+{ord(ch):04X} at {i}, {what} character: send text"
            )
    return text
