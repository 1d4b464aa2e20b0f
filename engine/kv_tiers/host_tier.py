"""The host-memory tier: a fixed number of block rows in host memory, and their index.

Capacity is counted in rows (``host_kv_bytes // block bytes``), allocated once, so the
tier can never hold more than it was given. A row read by an in-flight promotion is
*busy*: out of the index (its block now belongs to the device) but not reusable until the
copy is done.
"""

from __future__ import annotations

import torch

from engine.kv_tiers.block_copy import CopyDone
from engine.kv_tiers.tier_index import TierIndex


class HostTier:
    """Rows of host memory holding demoted KV blocks."""

    def __init__(self, storage: torch.Tensor) -> None:
        # (num_rows, L, 2, bs, H_kv, D): one block per row.
        self.storage = storage
        self.capacity = storage.shape[0]
        self.index = TierIndex()
        # Free rows; popped from the end, so low rows are used first.
        self._free_rows = list(range(self.capacity - 1, -1, -1))
        # Rows that in-flight promotions still read, with the copy that frees them.
        self._busy: list[tuple[CopyDone, int]] = []
        # Rows a demotion is still writing (CUDA), with the copy that fills them.
        self._landing: dict[int, CopyDone] = {}

    @property
    def num_free_rows(self) -> int:
        return len(self._free_rows)

    @property
    def num_busy_rows(self) -> int:
        return len(self._busy)

    def take_row(self) -> int | None:
        """A free row, or None when every row holds a block or is being read."""
        return self._free_rows.pop() if self._free_rows else None

    def release_row(self, row: int, after: CopyDone | None = None) -> None:
        """Give ``row`` back, at once or when ``after`` completes."""
        self._landing.pop(row, None)  # a later write to the row is ordered after it (one stream)
        if after is None or after.done():
            self._free_rows.append(row)
        else:
            self._busy.append((after, row))

    def landing(self, row: int, copy: CopyDone) -> None:
        """``row`` is being filled by ``copy`` (read it only after :meth:`read_row` waits)."""
        if not copy.done():
            self._landing[row] = copy

    def read_row(self, row: int) -> torch.Tensor:
        """A CPU copy of one row's block, once its demotion copy has landed."""
        copy = self._landing.pop(row, None)
        if copy is not None:
            copy.wait()
        return self.storage[row].clone()

    def poll(self) -> None:
        """Free the rows whose promotions finished copying."""
        self._landing = {r: c for r, c in self._landing.items() if not c.done()}
        if self._busy:
            still = []
            for copy, row in self._busy:
                if copy.done():
                    self._free_rows.append(row)
                else:
                    still.append((copy, row))
            self._busy = still
