"""CUDA graphs for decode-only steps: capture once per batch size, replay with padding.

A decode step of a small model is dominated by kernel-launch overhead (a few dozen
launches per layer, each a few microseconds of CPU time, for microseconds of GPU work).
:class:`DecodeGraphRunner` captures the model's forward for a decode-only batch (every
chunk one token) at a fixed set of batch sizes, reading its inputs from static device
buffers, and replays the smallest graph that holds the step's batch. Rows beyond the real
batch are padding: token 0 at position 0, slot -1 (the Triton store kernel skips it, so
the KV cache is never touched), context length 1 and a block table row of zeros (the
decode kernel reads one finite cached token and the output row is discarded).

Graphs need the ``triton`` attention backend with a fixed decode grid
(``graph_max_context_len``): nothing in the captured forward may depend on host-side
per-step data. The padding and bucketing logic are plain functions, tested on CPU.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.attention.base import AttentionMetadata
from engine.forward_context import ForwardContext
from engine.scheduler import SchedulerOutput

# Largest batch ever captured: beyond this a decode step is compute-bound enough that
# launch overhead no longer matters, and every graph costs capture time and memory.
MAX_GRAPH_BATCH_SIZE = 256
# Batch sizes below 16 are captured exactly at powers of two; from 16 on, powers of two
# and 1.5x powers of two (16, 24, 32, 48, ...) bound the padding waste to 50% (33% mostly).
_SMALL_SIZES = (1, 2, 4, 8)
# Eager warm-up runs before each capture: compile the Triton kernels and initialise
# cuBLAS handles/workspaces outside the graph (neither may happen during capture).
_WARMUP_RUNS = 2


def graph_batch_sizes(max_num_seqs: int, max_batch: int = 64) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, 16, 24, 32, 48, 64, 96, ... up to the limit.

    The limit is ``min(max_num_seqs, max_batch, 256)``; it is always captured itself, so
    every decode batch the scheduler can form (up to the limit) has a graph.
    """
    if max_num_seqs < 1 or max_batch < 1:
        raise ValueError(f"max_num_seqs and max_batch must be positive, got {max_num_seqs} and {max_batch}")
    limit = min(max_num_seqs, max_batch, MAX_GRAPH_BATCH_SIZE)
    sizes = [s for s in _SMALL_SIZES if s <= limit]
    base = 16
    while base <= limit:
        sizes.append(base)
        if base * 3 // 2 <= limit:
            sizes.append(base * 3 // 2)
        base *= 2
    if sizes[-1] != limit:
        sizes.append(limit)
    return sizes


def pick_graph_batch_size(batch_sizes: Sequence[int], num_seqs: int) -> int | None:
    """The smallest captured size >= ``num_seqs`` (sizes ascending); None when none fits."""
    if num_seqs < 1:
        raise ValueError(f"num_seqs must be positive, got {num_seqs}")
    i = bisect.bisect_left(batch_sizes, num_seqs)
    return batch_sizes[i] if i < len(batch_sizes) else None


def use_cuda_graphs(device: torch.device, attention_backend: str, enforce_eager: bool) -> bool:
    """Graphs need CUDA and the Triton backend (whose decode grid can be fixed)."""
    return not enforce_eager and device.type == "cuda" and attention_backend == "triton"


@dataclass
class PaddedDecodeBatch:
    """Host-side inputs of one decode step, padded to a captured batch size."""

    # (B_pad,) int64: the token each sequence feeds; padding rows 0.
    input_ids: np.ndarray
    # (B_pad,) int64: its position; padding rows 0.
    positions: np.ndarray
    # (B_pad,) int64: cache slot of its K/V; padding rows -1 (the store kernel skips them).
    slot_mapping: np.ndarray
    # (B_pad, max_blocks_per_seq) int32: block ids covering each context, 0 elsewhere;
    # padding rows are all 0.
    block_tables: np.ndarray
    # (B_pad,) int32: context length including the new token; padding rows 1.
    context_lens: np.ndarray


def pad_decode_batch(
    input_ids: Sequence[int],
    positions: Sequence[int],
    slot_mapping: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    context_lens: Sequence[int],
    *,
    padded_batch: int,
    max_blocks_per_seq: int,
    block_size: int,
) -> PaddedDecodeBatch:
    """Pad ``B`` decode sequences to ``padded_batch`` rows (see module docstring).

    ``block_tables[i]`` may hold more blocks than context ``i`` covers (blocks reserved
    ahead); only the first ``ceil(context_lens[i] / block_size)`` are kept, as the eager
    path does.
    """
    n = len(input_ids)
    if not (len(positions) == len(slot_mapping) == len(block_tables) == len(context_lens) == n):
        raise ValueError("input_ids, positions, slot_mapping, block_tables and context_lens differ in length")
    if n > padded_batch:
        raise ValueError(f"{n} sequences do not fit a padded batch of {padded_batch}")
    ids = np.zeros(padded_batch, dtype=np.int64)
    pos = np.zeros(padded_batch, dtype=np.int64)
    slots = np.full(padded_batch, -1, dtype=np.int64)
    tables = np.zeros((padded_batch, max_blocks_per_seq), dtype=np.int32)
    lens = np.ones(padded_batch, dtype=np.int32)
    ids[:n] = input_ids
    pos[:n] = positions
    slots[:n] = slot_mapping
    lens[:n] = context_lens
    for row, (table, ctx) in enumerate(zip(block_tables, context_lens)):
        if ctx < 1:
            raise ValueError(f"context length must be >= 1, got {ctx} for row {row}")
        nb = -(-ctx // block_size)
        if nb > max_blocks_per_seq:
            raise ValueError(
                f"context of {ctx} tokens needs {nb} blocks; graphs hold {max_blocks_per_seq} per sequence"
            )
        if len(table) < nb:
            raise ValueError(f"row {row}: context of {ctx} tokens needs {nb} blocks, table has {len(table)}")
        tables[row, :nb] = table[:nb]
    return PaddedDecodeBatch(ids, pos, slots, tables, lens)


class DecodeGraphRunner:
    """Captured decode forwards, one per batch size, over static input buffers.

    The graphs bake in the addresses of ``kv_cache`` and the model's weights: both must
    stay where they are (in-place writes are fine) for the runner's lifetime.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: torch.Tensor,  # (L, 2, num_blocks, block_size, H_kv, D)
        block_size: int,
        max_model_len: int,
        batch_sizes: Sequence[int],
        *,
        fused_kernels: bool = False,
    ) -> None:
        from engine.attention.triton_backend import TritonAttentionBackend  # noqa: PLC0415 - needs triton

        if not batch_sizes or list(batch_sizes) != sorted(set(batch_sizes)) or batch_sizes[0] < 1:
            raise ValueError(f"batch_sizes must be ascending, distinct and positive, got {list(batch_sizes)}")
        if max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {max_model_len}")
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.batch_sizes = list(batch_sizes)
        self.max_batch_size = self.batch_sizes[-1]
        # Fixed decode grid: the split count then depends only on the batch size.
        self.backend = TritonAttentionBackend(graph_max_context_len=max_model_len)
        self.fused_kernels = fused_kernels
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # Each graph's output hidden states (B_pad, hidden), overwritten by every replay.
        self.outputs: dict[int, torch.Tensor] = {}
        # Decode steps served by a replay (observability; tests check graphs were used).
        self.num_replays = 0

        dev, b = kv_cache.device, self.max_batch_size
        # Inference tensors: captured and refreshed under inference mode only.
        with torch.inference_mode():
            self.input_ids = torch.zeros(b, dtype=torch.long, device=dev)  # (B_max,)
            self.positions = torch.zeros(b, dtype=torch.long, device=dev)  # (B_max,)
            self.slot_mapping = torch.full((b,), -1, dtype=torch.long, device=dev)  # (B_max,)
            self.block_tables = torch.zeros(b, self.max_blocks_per_seq, dtype=torch.int32, device=dev)
            self.context_lens = torch.ones(b, dtype=torch.int32, device=dev)  # (B_max,)
            # A decode-only step has no prefill part: empty, but well-formed for the backend.
            self._no_prefill_tables = torch.zeros((0, 1), dtype=torch.int32, device=dev)
            self._no_prefill_start = torch.zeros(1, dtype=torch.int32, device=dev)
            self._no_prefill_lens = torch.zeros(0, dtype=torch.int32, device=dev)
            self._no_logits = torch.zeros(0, dtype=torch.long, device=dev)

    # ----------------------------------------------------------------- steps
    def can_run(self, out: SchedulerOutput) -> bool:
        """True when ``out`` is decode-only, fits a captured size and graphs exist."""
        if not self.graphs or out.prefills or not out.decodes or len(out.decodes) > self.max_batch_size:
            return False
        return max(c.start + 1 for c in out.decodes) <= self.max_model_len

    def run_step(
        self, out: SchedulerOutput, input_ids: list[int], positions: list[int], slots: list[int]
    ) -> torch.Tensor:  # (B_pad, hidden)
        """Replay for a decode-only step (``can_run`` must hold); rows past the batch are padding."""
        dec = out.decodes
        tables = [[blk.block_id for blk in c.request.blocks] for c in dec]
        return self.run(input_ids, positions, slots, tables, [c.start + 1 for c in dec])

    def run(
        self,
        input_ids: Sequence[int],
        positions: Sequence[int],
        slot_mapping: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        context_lens: Sequence[int],
    ) -> torch.Tensor:  # (B_pad, hidden)
        """Load a decode batch into the static buffers and replay its graph."""
        size = self.prepare(input_ids, positions, slot_mapping, block_tables, context_lens)
        graph = self.graphs.get(size)
        if graph is None:
            raise RuntimeError(f"no CUDA graph captured for batch size {size}; call capture() first")
        graph.replay()
        self.num_replays += 1
        return self.outputs[size]

    def prepare(
        self,
        input_ids: Sequence[int],
        positions: Sequence[int],
        slot_mapping: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        context_lens: Sequence[int],
    ) -> int:
        """Pad the batch and copy it into the static buffers; return the padded size."""
        size = pick_graph_batch_size(self.batch_sizes, len(input_ids))
        if size is None:
            raise ValueError(f"batch of {len(input_ids)} exceeds the largest graph ({self.max_batch_size})")
        p = pad_decode_batch(
            input_ids, positions, slot_mapping, block_tables, context_lens,
            padded_batch=size, max_blocks_per_seq=self.max_blocks_per_seq, block_size=self.block_size,
        )
        with torch.inference_mode():
            # Whole rows of the block table: stale ids from an earlier, longer step are cleared.
            # non_blocking: a copy from pageable host memory is staged before it returns, so
            # the numpy arrays may go away, and we skip a stream sync per buffer.
            for buf, host in (
                (self.input_ids, p.input_ids),
                (self.positions, p.positions),
                (self.slot_mapping, p.slot_mapping),
                (self.block_tables, p.block_tables),
                (self.context_lens, p.context_lens),
            ):
                buf[:size].copy_(torch.from_numpy(host), non_blocking=True)
        return size

    def forward_static(self, size: int) -> torch.Tensor:  # (size, hidden)
        """The forward the graphs capture: the model on the first ``size`` static rows."""
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            num_decode_tokens=size,
            decode_block_tables=self.block_tables[:size],
            decode_context_lens=self.context_lens[:size],
            # A valid bound; the backend ignores it because graph_max_context_len is set.
            decode_context_lens_list=[self.max_model_len] * size,
            prefill_block_tables=self._no_prefill_tables,
            prefill_query_start_loc=self._no_prefill_start,
            prefill_context_lens=self._no_prefill_lens,
            prefill_query_lens_list=[],
            prefill_context_lens_list=[],
            block_size=self.block_size,
        )
        ctx = ForwardContext(
            kv_cache=self.kv_cache, attn_metadata=meta, backend=self.backend, logits_indices=self._no_logits,
            fused_kernels=self.fused_kernels,
        )
        return self.model(self.input_ids[:size], self.positions[:size], ctx)

    # --------------------------------------------------------------- capture
    def capture(self, show_progress: bool = True) -> None:
        """Warm up and capture one graph per batch size (long work: a progress bar on stderr)."""
        if self.kv_cache.device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need a CUDA KV cache, got {self.kv_cache.device}")
        from rich.console import Console  # noqa: PLC0415
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: PLC0415

        # Padding everywhere while warming up and capturing: slots -1 write no KV.
        with torch.inference_mode():
            self.slot_mapping.fill_(-1)
            self.context_lens.fill_(1)
            self.block_tables.zero_()
        pool = torch.cuda.graph_pool_handle()
        with Progress(
            TextColumn("capturing CUDA graphs: [bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),  # stdout may carry a server's or CLI's real output
            disable=not show_progress,
        ) as progress:
            task = progress.add_task("", total=len(self.batch_sizes))
            # Largest first: smaller graphs then fit in the memory the largest one pooled.
            for size in reversed(self.batch_sizes):
                progress.update(task, description=f"batch {size}")
                self._capture_one(size, pool)
                progress.update(task, advance=1)
        torch.cuda.synchronize(self.kv_cache.device)

    @torch.inference_mode()
    def _capture_one(self, size: int, pool: tuple[int, int]) -> None:
        for _ in range(_WARMUP_RUNS):
            self.forward_static(size)
        torch.cuda.synchronize(self.kv_cache.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = self.forward_static(size)
        self.graphs[size] = graph
        self.outputs[size] = out
