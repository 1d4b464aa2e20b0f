"""KV block copies between the device's paged cache and host memory.

The device cache is ``(L, 2, num_blocks, block_size, H_kv, D)`` (``engine.model_runner``).
Host-side blocks are stored one per row, ``(n, L, 2, block_size, H_kv, D)``, so a block's
bytes are contiguous: the disk tier writes a row as it is.

On CPU every copy is a synchronous ``index_copy_``. On CUDA copies run on a side stream
so they overlap other requests' compute:

* device -> host (a demotion): the side stream first waits for the compute stream (the
  block's KV is final), gathers the blocks into a device buffer, and the *compute* stream
  waits only for that gather before it may overwrite the blocks; the device-to-host
  transfers into pinned memory go on behind it.
* host -> device (a promotion): the transfers and the scatter into the cache run on the
  side stream; the scheduler runs the request only once :meth:`CopyDone.done` says so.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class CopyDone:
    """Completion of one batch of copies (already complete on CPU)."""

    def __init__(self, event: torch.cuda.Event | None = None) -> None:
        self._event = event

    def done(self) -> bool:
        return self._event is None or self._event.query()

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()


class BlockCopier:
    """Moves whole KV blocks (all layers, keys and values) in and out of one device cache."""

    def __init__(self, kv_cache: torch.Tensor) -> None:
        if kv_cache.dim() != 6 or kv_cache.shape[1] != 2:
            raise ValueError(f"kv_cache must be (L, 2, num_blocks, bs, H_kv, D), got {tuple(kv_cache.shape)}")
        self.kv_cache = kv_cache
        self.device = kv_cache.device
        num_layers, _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        # Shape of one block as stored outside the device cache: (L, 2, bs, H_kv, D).
        self.block_shape = (num_layers, 2, block_size, num_kv_heads, head_dim)
        self.block_nbytes = kv_cache[:, :, 0].numel() * kv_cache.element_size()
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def host_buffer(self, num_blocks: int) -> torch.Tensor:
        """(n, L, 2, bs, H_kv, D) host memory for ``num_blocks`` blocks (pinned on CUDA)."""
        pin = self._stream is not None
        # Uninitialised: a row is always written before it is read (and untouched pages cost nothing).
        return torch.empty((num_blocks, *self.block_shape), dtype=self.kv_cache.dtype, pin_memory=pin)

    def _ids(self, block_ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor(list(block_ids), dtype=torch.long, device=self.device)

    # ----------------------------------------------------------- device -> host
    def to_host(self, block_ids: Sequence[int], host: torch.Tensor, rows: Sequence[int]) -> CopyDone:
        """Copy device blocks ``block_ids`` into ``host[rows]``; the blocks may be reused at once."""
        if len(block_ids) != len(rows):
            raise ValueError(f"{len(block_ids)} blocks for {len(rows)} host rows")
        if not block_ids:
            return CopyDone()
        if self._stream is None:
            gathered = self.kv_cache.index_select(2, self._ids(block_ids))  # (L, 2, n, bs, H, D)
            host.index_copy_(0, torch.tensor(list(rows), dtype=torch.long), gathered.permute(2, 0, 1, 3, 4, 5))
            return CopyDone()
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._stream):
            self._stream.wait_stream(compute)
            gathered = self.kv_cache.index_select(2, self._ids(block_ids)).permute(2, 0, 1, 3, 4, 5).contiguous()
            compute.wait_event(self._stream.record_event())  # only the gather gates reuse
            for i, row in enumerate(rows):
                host[row].copy_(gathered[i], non_blocking=True)
            return CopyDone(self._stream.record_event())

    def to_cpu(self, block_ids: Sequence[int]) -> torch.Tensor:
        """(n, L, 2, bs, H_kv, D) CPU copy of device blocks, complete on return (disk writes)."""
        rows = self.host_buffer(len(block_ids)) if self._stream is not None else torch.empty(
            (len(block_ids), *self.block_shape), dtype=self.kv_cache.dtype
        )
        self.to_host(block_ids, rows, range(len(block_ids))).wait()
        return rows

    # ----------------------------------------------------------- host -> device
    def to_device(self, src: torch.Tensor, rows: Sequence[int], block_ids: Sequence[int]) -> CopyDone:
        """Copy host blocks ``src[rows]`` into device blocks ``block_ids``."""
        if len(block_ids) != len(rows):
            raise ValueError(f"{len(rows)} host rows for {len(block_ids)} blocks")
        if not block_ids:
            return CopyDone()
        if self._stream is None:
            picked = src.index_select(0, torch.tensor(list(rows), dtype=torch.long))  # (n, L, 2, bs, H, D)
            self.kv_cache.index_copy_(2, self._ids(block_ids), picked.permute(1, 2, 0, 3, 4, 5))
            return CopyDone()
        with torch.cuda.stream(self._stream):
            staged = torch.empty((len(rows), *self.block_shape), dtype=self.kv_cache.dtype, device=self.device)
            for i, row in enumerate(rows):
                staged[i].copy_(src[row], non_blocking=True)
            self.kv_cache.index_copy_(2, self._ids(block_ids), staged.permute(1, 2, 0, 3, 4, 5))
            return CopyDone(self._stream.record_event())
