"""Sets of cache keys in the driver, 16 bytes a key.

A run keeps two key sets for the whole dataset: the keys already answered in the output (what
resume skips) and the keys this run expects (what the summary counts). As Python sets of
strings they cost ~100 bytes a key, and the summary's Arrow `is_in` over them ~700 more at the
end of a run: the driver grew ~0.8 KB per problem (1045 MiB at 1M problems against 298 MiB at
10k, `benchmarks/annotate_memory.py`). A cache key is 32 hex digits, i.e. a 16-byte digest, so
here a set is one sorted numpy array of 16-byte values (`V16`, compared as bytes): membership is
a binary search, and a column of keys is converted and looked up in one vectorised step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

DIGEST = np.dtype("V16")
_NIBBLE = np.full(256, 255, np.uint8)  # ASCII hex digit -> its value; anything else -> 255
for _i, _c in enumerate(b"0123456789abcdef"):
    _NIBBLE[_c] = _i
    _NIBBLE[ord(chr(_c).upper())] = _i


def key_digest(key: str) -> bytes:
    """A cache key's 16 bytes: its hex value, or a BLAKE2b digest of a key of another form."""
    if len(key) == 32:
        try:
            digest = bytes.fromhex(key)
        except ValueError:
            digest = b""
        if len(digest) == 16:  # (fromhex skips spaces)
            return digest
    return hashlib.blake2b(key.encode(), digest_size=16).digest()


def key_digests(keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """`key_digest` of every key of a string column, in one pass for 32-hex-digit keys."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks() if keys.num_chunks else pa.array([], pa.string())
    keys = keys.cast(pa.string())
    n = len(keys)
    if n == 0:
        return np.empty(0, DIGEST)
    if keys.null_count:
        raise ValueError(f"{keys.null_count} null cache keys")
    if pc.all(pc.equal(pc.binary_length(keys), 32)).as_py():
        start = np.frombuffer(keys.buffers()[1], np.int32, count=1, offset=4 * keys.offset)[0]
        text = np.frombuffer(keys.buffers()[2], np.uint8, count=32 * n, offset=int(start))
        nibbles = _NIBBLE[text.reshape(n, 32)]
        if not (nibbles == 255).any():
            return ((nibbles[:, 0::2] << 4) | nibbles[:, 1::2]).view(DIGEST).ravel()
    return np.frombuffer(b"".join(key_digest(k) for k in keys.to_pylist()), DIGEST)


class KeySet:
    """Cache keys as sorted 16-byte digests: add freely, look up after.

    Adds go to a byte buffer; the first lookup sorts them in (once, until the next add). `count`
    is every key added, repeats included (a run's expected rows); `len` the distinct ones.
    """

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._sorted = np.empty(0, DIGEST)
        self._buffer = bytearray()
        self._arrays: list[np.ndarray] = []
        self.count = 0
        for key in keys:
            self.add(key)

    def add(self, key: str) -> None:
        self._buffer += key_digest(key)
        self.count += 1

    def update(self, keys: pa.Array | pa.ChunkedArray | Iterable[str]) -> None:
        digests = (
            key_digests(keys)
            if isinstance(keys, (pa.Array, pa.ChunkedArray))
            else np.frombuffer(b"".join(key_digest(k) for k in keys), DIGEST)
        )
        self._arrays.append(digests)
        self.count += len(digests)

    def digests(self) -> np.ndarray:
        """The distinct digests, sorted."""
        if self._buffer or self._arrays:
            merged = np.frombuffer(self._buffer, DIGEST)  # writable: the bytearray's own memory
            if len(self._sorted) or self._arrays:
                merged = np.concatenate([self._sorted, *self._arrays, merged])
            self._buffer, self._arrays = bytearray(), []
            merged.sort()  # in place, and distinct below: np.unique would hold 3 copies at once
            distinct = np.empty(len(merged), bool)
            distinct[:1] = True
            distinct[1:] = merged[1:] != merged[:-1]
            self._sorted = merged[distinct] if not distinct.all() else merged
        return self._sorted

    def find(self, digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found, position in `digests()`) for each digest; a position is meaningful if found."""
        table = self.digests()
        if not len(table):
            return np.zeros(len(digests), bool), np.zeros(len(digests), np.intp)
        pos = np.minimum(np.searchsorted(table, digests), len(table) - 1)
        return table[pos] == digests, pos

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        digest = np.frombuffer(key_digest(key), DIGEST)
        return bool(self.find(digest)[0][0])

    def __len__(self) -> int:
        return len(self.digests())

    def union(self, other: KeySet) -> KeySet:
        out = KeySet()
        out._arrays = [self.digests(), other.digests()]
        out.count = self.count + other.count
        return out
