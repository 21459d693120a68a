"""A shm reader parses a version's manifest against the layout it already checked: only the
members after the layout's table (version, checksums) are parsed when the table is byte for byte
the one it knows. That shortcut must answer exactly what the full parse answers, for honest
manifests and for crafted ones: the same layout, version and checksums, or a
CorruptCheckpointError from both."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpointing import CorruptCheckpointError
from checkpointing.backends.memory.layout import Layout, parse_manifest

STATE = {
    "emb": torch.zeros(10, 6),
    "norm": torch.zeros(6, dtype=torch.bfloat16),
    "w": torch.zeros(3, 4, 5),
    "step": torch.zeros((), dtype=torch.int64),
}


@pytest.fixture(scope="module")
def layout() -> Layout:
    return Layout.for_state(STATE, None)


def both(raw: bytes, data_len: int, known: Layout):
    """(full parse, parse with ``known``): each a result or the CorruptCheckpointError raised."""
    out = []
    for k in (None, known):
        try:
            out.append(parse_manifest(raw, data_len, "test", k))
        except CorruptCheckpointError as e:
            out.append(e)
    return out


@settings(max_examples=100, deadline=None)
@given(version=st.integers(-(2**63), 2**63 - 1), checksums=st.none() | st.lists(st.integers(0, 2**64 - 1), min_size=4, max_size=4))
def test_an_honest_manifest_parses_the_same_with_and_without_the_known_layout(layout, version, checksums):
    raw = layout.to_manifest(version, checksums)
    full, short = both(raw, layout.nbytes, layout)
    assert full == short == (layout, version, checksums)
    assert short[0] is layout  # the shortcut ran: the known layout itself came back


HEAD_ENDS = b'"aliases":{},'
TAILS = [
    b'"version":7,"checksums":null}',  # honest
    b'"version":7}',  # no checksums: allowed by both
    b'"version":"7","checksums":null}',  # a string version
    b'"version":true,"checksums":null}',  # a bool is not an integer
    b'"version":7,"checksums":[1]}',  # one checksum for four tensors
    b'"version":7,"checksums":[1,2,3,"4"]}',
    b'"version":7,"checksums":null,"tensors":[]}',  # a second table after the known one
    b'"version":7,"checksums":null,"format":"x"}',
    b'"version":7,"version":8,"checksums":null}',  # a repeated key
    b'"version":7,"checksums":null}garbage',
    b'"version":7,"checksums":null',  # truncated
    b'"checksums":null}',  # no version
    b'"version":7,"checksums":null,"extra":{}}',
    b'}',
    b'',
]


@pytest.mark.parametrize("tail", TAILS, ids=range(len(TAILS)))
def test_a_crafted_tail_after_the_known_table_gets_the_full_parses_answer(layout, tail):
    head = layout.to_manifest(0)[: layout.to_manifest(0).index(b'"version"')]
    assert head.endswith(HEAD_ENDS)
    full, short = both(head + tail, layout.nbytes, layout)
    if isinstance(full, CorruptCheckpointError):
        assert isinstance(short, CorruptCheckpointError), (tail, short)
    else:
        assert short == full


def test_a_known_table_that_no_longer_fits_the_segment_is_parsed_and_refused_in_full(layout):
    raw = layout.to_manifest(3)
    full, short = both(raw, layout.nbytes - 1, layout)
    assert isinstance(full, CorruptCheckpointError) and isinstance(short, CorruptCheckpointError)
    assert "outside" in str(short)


def test_another_table_is_parsed_in_full(layout):
    other = Layout.for_state({**STATE, "extra": torch.zeros(2)}, None)
    raw = other.to_manifest(5)
    parsed, version, _ = parse_manifest(raw, other.nbytes, "test", layout)
    assert parsed == other and parsed is not layout and version == 5
