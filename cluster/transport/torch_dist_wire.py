"""What both ends of a torch.distributed KV pair agree on: store keys, metadata, waits.

The sender (``torch_dist``) and the receiver (``torch_dist_recv``) meet in the receiver's
``TCPStore``. Everything one side writes and the other reads is spelled here, so the two
files cannot drift apart: the join/failed keys, the per-transfer metadata record (keyed by
pair group and sequence number), the 2-rank group constructor, the bounded wait on a
posted send/recv, and the graveyard where failed works are parked with their buffers.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cluster.transport.base import dtype_from_str

JOIN_COUNTER = "kvferry/joins"
# gloo tags are C ints; the tag is the per-pair sequence number, unique among in-flight ops.
TAG_MOD = 1 << 30


def tag(seq: int) -> int:
    """The gloo tag of a pair's ``seq``-th transfer (NCCL ignores it and goes by order)."""
    return seq % TAG_MOD


def join_key(n: int) -> str:
    """Set by a sender (value: its replica id) to ask for pair group ``n``."""
    return f"kvferry/join/{n}"


def failed_key(n: int) -> str:
    """Set by either side when a transfer on group ``n`` failed: nobody trusts it again."""
    return f"kvferry/failed/{n}"


def meta_key(n: int, seq: int) -> str:
    """Metadata of the ``seq``-th transfer on group ``n`` (outside the group's own prefix)."""
    return f"kvferry/meta/{n}/{seq}"


def group_prefix(n: int) -> str:
    """Store prefix private to pair group ``n``'s process group rendezvous."""
    return f"kvferry/pg/{n}/"


@dataclass(frozen=True)
class TransferMeta:
    """What the receiver needs to allocate and post the matching receive."""

    transfer_id: int
    shape: tuple[int, ...]
    dtype: str  # str(torch.dtype), e.g. "torch.bfloat16"

    def encode(self) -> str:
        return f"{self.transfer_id};{self.dtype};{','.join(str(s) for s in self.shape)}"

    @staticmethod
    def decode(raw: bytes | str) -> TransferMeta:
        text = raw.decode() if isinstance(raw, bytes) else raw
        tid, dtype, dims = text.split(";")
        dtype_from_str(dtype)  # reject garbage before anything is allocated
        shape = tuple(int(d) for d in dims.split(",")) if dims else ()
        return TransferMeta(int(tid), shape, dtype)


def td(seconds: float) -> dt.timedelta:
    return dt.timedelta(seconds=seconds)


def make_group(backend: str, store: dist.Store, rank: int, timeout_s: float) -> dist.ProcessGroup:
    """A 2-rank group (rank 0 = sender, 1 = receiver) on ``store``, already prefixed."""
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, 2, td(timeout_s))
    if backend == "nccl":
        # PyTorch's default (3) tears the whole process down when a NCCL op times out or
        # fails. A pair group is disposable (a failed transfer means local recompute and a
        # fresh pair), so only its communicator is aborted (2). Read when a group is built;
        # an explicit setting of the operator's wins.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = td(timeout_s)
        return dist.ProcessGroupNCCL(store, rank, 2, opts)
    raise ValueError(f"torch.distributed transport does not do backend {backend!r}")


def await_work(work: dist.Work, backend: str, timeout_s: float) -> None:
    """Block until ``work`` has really finished, at most ``timeout_s``; raise otherwise.

    gloo's ``wait`` blocks the thread (and one timed-out wait breaks the pair, so it is
    called once, with the whole budget). NCCL's ``wait`` may only order the current CUDA
    stream after the op, so completion is polled first: "delivered" must mean the bytes
    landed, because the sender frees its buffer and the receiver hands it on. The final
    ``wait`` then raises if the op completed with an error.
    """
    if backend == "nccl":
        deadline = time.monotonic() + timeout_s
        pause = 2e-4
        while not work.is_completed():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"NCCL op not complete after {timeout_s}s")
            time.sleep(pause)
            pause = min(pause * 2, 2e-3)
    work.wait(td(max(timeout_s, 1e-3)))


class Graveyard:
    """Failed works parked with their buffers: the backend may still write into them.

    An entry can go once its work reports completion (the backend is done with the
    buffer) or once it is older than ``max_age_s`` (past the group timeout the backend has
    given up on the op); at most ``max_entries`` are kept, oldest dropped first.
    """

    def __init__(self, max_age_s: float, max_entries: int = 256) -> None:
        self.max_age_s = max_age_s
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: list[tuple[float, dist.Work | None, torch.Tensor | None]] = []

    def bury(self, work: dist.Work | None, buf: torch.Tensor | None) -> None:
        with self._lock:
            if work is not None or buf is not None:
                self._entries.append((time.monotonic(), work, buf))
            self._prune_locked(time.monotonic())

    def prune(self, now: float | None = None) -> None:
        with self._lock:
            self._prune_locked(time.monotonic() if now is None else now)

    def __len__(self) -> int:
        return len(self._entries)

    def _prune_locked(self, now: float) -> None:
        keep = [e for e in self._entries if now - e[0] <= self.max_age_s and not _finished(e[1])]
        self._entries = keep[-self.max_entries :]


def _finished(work: dist.Work | None) -> bool:
    if work is None:
        return True
    try:
        return bool(work.is_completed())
    except Exception:  # noqa: BLE001 - a work that cannot even say is a dead one
        return True
