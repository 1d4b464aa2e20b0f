"""varlen_slots / gather_varlen: packing paged contexts back to back (flash-attn input)."""

from __future__ import annotations

import pytest
import torch

from kernels.paged_gather import gather_varlen, varlen_slots


def test_slots_follow_block_tables():
    tables = torch.tensor([[3, 1, 0], [2, 0, 0]], dtype=torch.int32)
    slots = varlen_slots(tables, [6, 2], block_size=4)
    # Sequence 0: block 3 rows 0..3, then block 1 rows 0..1; sequence 1: block 2 rows 0..1.
    assert slots.tolist() == [12, 13, 14, 15, 4, 5, 8, 9]


def test_gather_packs_contexts_back_to_back():
    cache = torch.randn(5, 4, 2, 3)
    tables = torch.tensor([[4, 0], [1, 2]], dtype=torch.int32)
    packed = gather_varlen(cache, varlen_slots(tables, [5, 7], 4))
    assert packed.shape == (12, 2, 3)
    assert torch.equal(packed[:4], cache[4]) and torch.equal(packed[4], cache[0, 0])
    assert torch.equal(packed[5:12], torch.cat([cache[1], cache[2, :3]]))


def test_length_beyond_table_is_rejected():
    with pytest.raises(ValueError, match="exceeds"):
        varlen_slots(torch.zeros(1, 2, dtype=torch.int32), [9], block_size=4)
