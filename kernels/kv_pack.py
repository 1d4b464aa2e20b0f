"""Pack a list of KV blocks into one contiguous buffer for transfer, and unpack it.

The engine's KV cache is one tensor ``(num_layers, 2, num_blocks, block_size, H_kv, D)``.
A transfer moves ``n`` blocks of every layer; sending them one by one would cost
``num_layers * 2 * n`` messages, so the sender gathers them into one contiguous
``(num_layers, 2, n, block_size, H_kv, D)`` buffer and the receiver scatters it back.

:func:`gather_blocks` / :func:`scatter_blocks` dispatch: Triton on CUDA (one launch for all
layers), torch ``index_select`` / ``index_copy_`` elsewhere. The ``*_reference`` and
``*_triton`` variants are public for tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels.launch import (
    FLOAT_DTYPES,
    check_dtype,
    check_launchable,
    check_shape,
    lazy_jit,
    triton_available,
)

if triton_available():
    import triton
    import triton.language as tl

# Elements copied per program; a block of a Llama-8B layer (16 x 8 x 128) takes 8 programs.
CHUNK = 2048

BlockIds = Sequence[int] | torch.Tensor


def _block_id_tensor(block_ids: BlockIds, num_blocks: int, device: torch.device) -> torch.Tensor:
    """Validate ids (range checks only for host-side ids: a device tensor would need a sync)."""
    if isinstance(block_ids, torch.Tensor):
        if block_ids.dim() != 1:
            raise ValueError(f"block_ids must be 1-D, got shape {tuple(block_ids.shape)}")
        if block_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"block_ids must be int32/int64, got {block_ids.dtype}")
        if block_ids.device.type == "cpu" and block_ids.numel():
            lo, hi = int(block_ids.min()), int(block_ids.max())
            if lo < 0 or hi >= num_blocks:
                raise ValueError(f"block id out of range [0, {num_blocks}): {lo if lo < 0 else hi}")
        return block_ids.to(device=device, dtype=torch.int64)
    ids = list(block_ids)
    bad = [b for b in ids if not 0 <= int(b) < num_blocks]
    if bad:
        raise ValueError(f"block id out of range [0, {num_blocks}): {bad[0]}")
    return torch.tensor(ids, dtype=torch.int64, device=device)


def _check_cache(name: str, kv_cache: torch.Tensor) -> None:
    if kv_cache.dim() != 6 or kv_cache.shape[1] != 2:
        raise ValueError(
            f"{name}: kv_cache must be (num_layers, 2, num_blocks, block_size, H_kv, D), "
            f"got {tuple(kv_cache.shape)}"
        )


def _buffer_shape(kv_cache: torch.Tensor, n: int) -> tuple[int, ...]:
    num_layers, _, _, bs, h_kv, d = kv_cache.shape
    return (num_layers, 2, n, bs, h_kv, d)


def gather_blocks_reference(kv_cache: torch.Tensor, block_ids: BlockIds) -> torch.Tensor:
    """(L, 2, NB, bs, H_kv, D) -> contiguous (L, 2, n, bs, H_kv, D) via ``index_select``."""
    _check_cache("gather_blocks", kv_cache)
    ids = _block_id_tensor(block_ids, kv_cache.shape[2], kv_cache.device)
    return kv_cache.index_select(2, ids).contiguous()


def scatter_blocks_reference(
    kv_cache: torch.Tensor, block_ids: BlockIds, buffer: torch.Tensor
) -> None:
    """Write ``buffer`` (L, 2, n, bs, H_kv, D) into blocks ``block_ids`` via ``index_copy_``."""
    _check_cache("scatter_blocks", kv_cache)
    ids = _block_id_tensor(block_ids, kv_cache.shape[2], kv_cache.device)
    check_shape("scatter_blocks", "buffer", buffer, _buffer_shape(kv_cache, ids.numel()))
    check_dtype("scatter_blocks", "buffer", buffer, (kv_cache.dtype,))
    kv_cache.index_copy_(2, ids, buffer.to(kv_cache.device))


if triton_available():

    @lazy_jit
    def _kv_pack_kernel(
        cache_ptr,  # (L * 2, num_blocks, BLOCK_ELEMS), dense
        buffer_ptr,  # (L * 2, n, BLOCK_ELEMS), dense
        block_ids_ptr,  # (n,) int64
        num_blocks,
        n,
        BLOCK_ELEMS: tl.constexpr,  # block_size * H_kv * D
        CHUNK: tl.constexpr,
        SCATTER: tl.constexpr,
    ):
        # Blocks on grid axis 0: axes 1 and 2 stop at 65535 programs, and a long prompt
        # moves more blocks than that (1M tokens of 16-token blocks).
        i = tl.program_id(0)
        lk = tl.program_id(1).to(tl.int64)  # layer * 2 + (0 for K, 1 for V)
        c = tl.program_id(2)
        block = tl.load(block_ids_ptr + i)
        offs = c * CHUNK + tl.arange(0, CHUNK)
        mask = offs < BLOCK_ELEMS
        cache_offs = (lk * num_blocks + block) * BLOCK_ELEMS + offs
        buf_offs = (lk * n + i) * BLOCK_ELEMS + offs
        if SCATTER:
            tl.store(cache_ptr + cache_offs, tl.load(buffer_ptr + buf_offs, mask=mask), mask=mask)
        else:
            tl.store(buffer_ptr + buf_offs, tl.load(cache_ptr + cache_offs, mask=mask), mask=mask)


def _launch(name: str, kv_cache: torch.Tensor, ids: torch.Tensor, buffer: torch.Tensor, scatter: bool) -> None:
    check_launchable(name, kv_cache, ids, buffer)
    check_dtype(name, "kv_cache", kv_cache, FLOAT_DTYPES)
    check_dtype(name, "buffer", buffer, (kv_cache.dtype,))
    check_shape(name, "buffer", buffer, _buffer_shape(kv_cache, ids.numel()))
    if not kv_cache.is_contiguous() or not buffer.is_contiguous():
        raise ValueError(f"{name}: kv_cache and buffer must be contiguous")
    n = ids.numel()
    if n == 0:
        return
    num_layers, _, num_blocks, bs, h_kv, d = kv_cache.shape
    block_elems = bs * h_kv * d
    grid = (n, num_layers * 2, triton.cdiv(block_elems, CHUNK))
    _kv_pack_kernel[grid](
        kv_cache, buffer, ids, num_blocks, n,
        BLOCK_ELEMS=block_elems, CHUNK=CHUNK, SCATTER=scatter,
    )


def gather_blocks_triton(
    kv_cache: torch.Tensor, block_ids: BlockIds, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Triton gather: one launch copies block ``block_ids[i]`` of every layer to slot ``i``."""
    _check_cache("gather_blocks", kv_cache)
    ids = _block_id_tensor(block_ids, kv_cache.shape[2], kv_cache.device)
    if out is None:
        out = torch.empty(_buffer_shape(kv_cache, ids.numel()), dtype=kv_cache.dtype, device=kv_cache.device)
    _launch("gather_blocks", kv_cache, ids, out, scatter=False)
    return out


def scatter_blocks_triton(kv_cache: torch.Tensor, block_ids: BlockIds, buffer: torch.Tensor) -> None:
    """Triton scatter: slot ``i`` of ``buffer`` goes to block ``block_ids[i]`` of every layer."""
    _check_cache("scatter_blocks", kv_cache)
    ids = _block_id_tensor(block_ids, kv_cache.shape[2], kv_cache.device)
    if buffer.device != kv_cache.device:
        buffer = buffer.to(kv_cache.device)
    _launch("scatter_blocks", kv_cache, ids, buffer, scatter=True)


def _use_triton(kv_cache: torch.Tensor) -> bool:
    return kv_cache.is_cuda and triton_available() and kv_cache.is_contiguous()


def gather_blocks(kv_cache: torch.Tensor, block_ids: BlockIds) -> torch.Tensor:
    """Blocks ``block_ids`` of every layer as one contiguous (L, 2, n, bs, H_kv, D) tensor."""
    if _use_triton(kv_cache):
        return gather_blocks_triton(kv_cache, block_ids)
    return gather_blocks_reference(kv_cache, block_ids)


def scatter_blocks(kv_cache: torch.Tensor, block_ids: BlockIds, buffer: torch.Tensor) -> None:
    """Write ``buffer`` (L, 2, n, bs, H_kv, D) into blocks ``block_ids`` of every layer.

    ``buffer`` may live on another device (e.g. a CPU staging buffer); it is copied over.
    Duplicate ids are a caller error (which copy wins is unspecified).
    """
    if _use_triton(kv_cache):
        scatter_blocks_triton(kv_cache, block_ids, buffer)
    else:
        scatter_blocks_reference(kv_cache, block_ids, buffer)
