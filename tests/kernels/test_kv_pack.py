"""gather_blocks / scatter_blocks: Triton against index_select / index_copy_, and the dispatcher."""

from __future__ import annotations

import pytest
import torch

from kernels.kv_pack import (
    gather_blocks,
    gather_blocks_reference,
    gather_blocks_triton,
    scatter_blocks,
    scatter_blocks_reference,
    scatter_blocks_triton,
)

# (num_layers, 2, num_blocks, block_size, H_kv, D); block of 4*3*40 = 480 elements is not a
# power of two, so the last chunk of each block is masked.
SHAPE = (3, 2, 10, 4, 3, 40)


def _cache(case):
    return torch.randn(SHAPE, device=case.device, dtype=case.dtype)


def test_gather_matches_reference(case):
    cache = _cache(case)
    ids = [7, 2, 9, 2]  # a repeated id is fine for a gather
    got = gather_blocks_triton(cache, ids)
    assert got.shape == (3, 2, 4, 4, 3, 40) and got.is_contiguous()
    assert torch.equal(got, gather_blocks_reference(cache, ids))
    assert torch.equal(got[:, :, 0], cache[:, :, 7])


def test_scatter_matches_reference_and_round_trips(case):
    src = _cache(case)
    buf = gather_blocks_triton(src, torch.tensor([5, 1, 8]))
    dst, dst_ref = torch.zeros_like(src), torch.zeros_like(src)
    scatter_blocks_triton(dst, [0, 6, 3], buf)
    scatter_blocks_reference(dst_ref, [0, 6, 3], buf)
    assert torch.equal(dst, dst_ref)
    # The receiver's blocks 0, 6, 3 hold the sender's 5, 1, 8 in every layer; others untouched.
    assert torch.equal(dst[:, :, [0, 6, 3]], src[:, :, [5, 1, 8]])
    untouched = [i for i in range(SHAPE[2]) if i not in (0, 6, 3)]
    assert not dst[:, :, untouched].any()


def test_empty_block_list(case):
    cache = _cache(case)
    assert gather_blocks_triton(cache, []).shape == (3, 2, 0, 4, 3, 40)
    scatter_blocks_triton(cache, [], torch.empty(3, 2, 0, 4, 3, 40, dtype=case.dtype, device=case.device))


def test_dispatcher_uses_torch_on_cpu(compiled_mode_on_cpu):
    # With the interpreter off, a Triton launch on CPU is refused; the dispatcher must not try.
    cache = torch.randn(SHAPE)
    buf = gather_blocks(cache, [1, 2])
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        gather_blocks_triton(cache, [1, 2])
    other = torch.zeros_like(cache)
    scatter_blocks(other, [4, 0], buf)
    assert torch.equal(other[:, :, [4, 0]], cache[:, :, [1, 2]])


@pytest.mark.parametrize("fn", [gather_blocks_triton, gather_blocks_reference])
def test_bad_ids_and_shapes_raise_value_error(case, fn):
    cache = _cache(case)
    with pytest.raises(ValueError, match="out of range"):
        fn(cache, [3, 10])
    with pytest.raises(ValueError, match="out of range"):
        fn(cache, torch.tensor([-1]))
    with pytest.raises(ValueError, match="num_layers, 2"):
        fn(cache[:, 0], [1])


@pytest.mark.parametrize("fn", [scatter_blocks_triton, scatter_blocks_reference])
def test_scatter_rejects_wrong_buffer(case, fn):
    cache = _cache(case)
    buf = torch.zeros(3, 2, 2, 4, 3, 40, device=case.device, dtype=case.dtype)
    with pytest.raises(ValueError, match="buffer has shape"):
        fn(cache, [1, 2, 3], buf)
    other = torch.float32 if case.dtype != torch.float32 else torch.float16
    with pytest.raises(ValueError, match="buffer has dtype"):
        fn(cache, [1, 2], buf.to(other))
