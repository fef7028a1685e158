"""`pipelines/keys.py`: key sets of 16-byte digests agree with Python sets of the keys."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
from hypothesis import given
from hypothesis import strategies as st

from pipelines.keys import KeySet, key_digest, key_digests

HEX = [hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(200)]
keys = st.lists(st.one_of(st.sampled_from(HEX), st.text(max_size=40)), max_size=60)


@given(added=keys, looked_up=keys)
def test_a_key_set_answers_as_a_python_set(added: list[str], looked_up: list[str]) -> None:
    half = len(added) // 2
    ks = KeySet(added[:half])  # one at a time ...
    ks.update(pa.array(added[half:], pa.string()))  # ... and a column at once
    assert ks.count == len(added) and len(ks) == len(set(added))
    for key in [*added, *looked_up]:
        assert (key in ks) == (key in set(added)), key
    found, pos = ks.find(key_digests(pa.array(looked_up, pa.string())))
    assert found.tolist() == [k in set(added) for k in looked_up]
    assert all(ks.digests()[p].tobytes() == key_digest(k) for k, p, f in
               zip(looked_up, pos, found, strict=True) if f)  # fmt: skip


def test_a_column_of_hex_keys_converts_in_one_pass_as_each_key_would() -> None:
    column = pa.chunked_array([HEX[:50], HEX[50:120]])
    sliced = pa.array(HEX).slice(7, 100)  # a slice: its offsets do not start at 0
    for keys_ in (column, sliced, pa.array(HEX, pa.large_string())):
        got = key_digests(keys_)
        assert got.dtype == np.dtype("V16")
        assert [d.tobytes() for d in got] == [key_digest(k) for k in keys_.to_pylist()]
    upper = key_digests(pa.array(["G" * 32, "ab " * 10 + "ab"]))  # not hex: hashed instead
    assert [d.tobytes() for d in upper] == [key_digest("G" * 32), key_digest("ab " * 10 + "ab")]
    assert key_digest("ab " * 10 + "ab") != bytes.fromhex("ab" * 11) and len(KeySet()) == 0


def test_union_holds_both_sets() -> None:
    a, b = KeySet(HEX[:10]), KeySet(HEX[5:20])
    both = a.union(b)
    assert len(both) == 20 and all(k in both for k in HEX[:20]) and HEX[20] not in both
