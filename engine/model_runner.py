"""Runs the model on a scheduled step: builds the flat batch and its paged metadata,
owns the KV cache tensor, and samples.

The KV cache of all layers is one tensor ``(num_layers, 2, num_blocks, block_size, H_kv, D)``
so that a list of blocks can be gathered for transfer in one indexing op.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from engine.attention import AttentionMetadata, get_attention_backend
from engine.config import AttentionBackendName, CpuLinear, EngineConfig, FusedKernels, PrefillAttention
from engine.cuda_graph import DecodeGraphRunner, graph_batch_sizes, use_cuda_graphs
from engine.forward_context import ForwardContext
from engine.models.linear_setup import LinearPlan, setup_cpu_linears
from engine.sampler import Sampler
from engine.scheduler import SchedulerOutput

if TYPE_CHECKING:
    from engine.models.compiled import CompiledForward

# kernels/ is imported lazily, inside the functions that launch kernels: importing triton
# fixes its compiled-vs-interpreted mode for the whole process (TRITON_INTERPRET), and the
# engine must be importable (and usable on CPU) without deciding that.


def kv_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one KV block across all layers (keys and values)."""
    return num_layers * 2 * block_size * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


def num_kv_blocks(config: EngineConfig, model_config: Any, dtype: torch.dtype) -> int:
    """The KV cache's size in blocks: ``num_kv_blocks``, else what ``kv_cache_memory_bytes`` holds."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    per_block = kv_bytes_per_block(
        model_config.num_layers, config.block_size, model_config.num_kv_heads, model_config.head_dim, dtype
    )
    num_blocks = config.kv_cache_memory_bytes // per_block
    if num_blocks < 2:
        raise ValueError(
            f"kv_cache_memory_bytes={config.kv_cache_memory_bytes} holds fewer than 2 blocks of {per_block} bytes"
        )
    return num_blocks


def resolve_fused_kernels(setting: FusedKernels, device: torch.device) -> bool:
    """``EngineConfig.fused_kernels`` -> whether this engine launches the fused kernels.

    "auto" is off for now, on every device. On CPU the kernels only run in the slow
    interpreter. On CUDA they have been checked only in that interpreter, never compiled
    or timed on a GPU. Turn "auto" on for CUDA once the ``gpu`` tests pass there and
    ``benchmarks/gpu/fused_ops.py`` shows a gain. ``EngineConfig`` has already refused any
    other value; what is left to check is whether this device can launch them.
    """
    if setting != "on":
        return False
    from kernels.launch import can_launch  # noqa: PLC0415 - see the note on imports above

    if not can_launch(device):
        raise ValueError(
            f"fused_kernels='on' needs triton and a CUDA device (got {device}); on CPU set "
            "TRITON_INTERPRET=1 (tests) or use fused_kernels='off'"
        )
    return True


class ModelRunner:
    """Executes one scheduler step on the model and returns the sampled tokens."""

    def __init__(
        self,
        model: torch.nn.Module,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        attention_backend: AttentionBackendName,
        *,
        max_model_len: int = 0,
        max_num_seqs: int = 1,
        enforce_eager: bool = True,
        cuda_graph_max_batch: int = 64,
        fused_kernels: FusedKernels = "off",
        prefill_attention: PrefillAttention = "auto",
        cpu_linear: CpuLinear = "dense",
        max_num_batched_tokens: int = 512,
        compile_model: bool = False,
    ) -> None:
        self.model = model
        # Before anything runs the model: packing may drop the dense weights.
        self.linear_plan: LinearPlan = setup_cpu_linears(
            model, cpu_linear, device, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens
        )
        self.block_size = block_size
        self.device = device
        self.backend = get_attention_backend(attention_backend, prefill_attention=prefill_attention)
        self.fused_kernels = resolve_fused_kernels(fused_kernels, device)
        # (L, 2, num_blocks, block_size, H_kv, D): zeros so unused slots are finite.
        self.kv_cache = torch.zeros(
            (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim), dtype=dtype, device=device
        )
        self.sampler = Sampler()
        # torch.compile of the forward (CPU only: CUDA steps use CUDA graphs instead).
        self.compiled: CompiledForward | None = None
        if compile_model and device.type == "cpu":
            from engine.models.compiled import CompiledForward  # noqa: PLC0415 - registers ops, only if used

            self.compiled = CompiledForward(model)
        # Decode-only steps replay CUDA graphs (engine.cuda_graph) when enabled; captured
        # now, after the KV cache exists, because the graphs bake in its address.
        self.graph_runner: DecodeGraphRunner | None = None
        if use_cuda_graphs(device, attention_backend, enforce_eager) and max_model_len > 0:
            sizes = graph_batch_sizes(max_num_seqs, cuda_graph_max_batch)
            self.graph_runner = DecodeGraphRunner(
                model, self.kv_cache, block_size, max_model_len, sizes, fused_kernels=self.fused_kernels
            )
            self.graph_runner.capture()

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> list[int]:
        """Compute the step; return one sampled token per chunk with ``samples`` True, in order."""
        chunks = out.chunks
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        for chunk in chunks:
            req = chunk.request
            start, end = chunk.start, chunk.start + chunk.num_tokens
            input_ids.extend(req.all_token_ids[start:end])
            positions.extend(range(start, end))
            table = [b.block_id for b in req.blocks]
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if chunk.samples:
                logits_indices.append(len(input_ids) - 1)

        logits_idx = torch.tensor(logits_indices, dtype=torch.long, device=self.device)
        if self.graph_runner is not None and self.graph_runner.can_run(out):
            # (B_pad, hidden): rows past the batch are padding, never indexed below.
            hidden = self.graph_runner.run_step(out, input_ids, positions, slots)
        else:
            meta = self._metadata(out, slots)
            ctx = ForwardContext(
                kv_cache=self.kv_cache, attn_metadata=meta, backend=self.backend, logits_indices=logits_idx,
                fused_kernels=self.fused_kernels,
            )
            ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
            pos = torch.tensor(positions, dtype=torch.long, device=self.device)
            forward = self.compiled or self.model
            hidden = forward(ids, pos, ctx)  # (T, hidden)
        if not logits_indices:
            return []
        logits = self.model.compute_logits(hidden[logits_idx])  # (N, V)
        sampled = [c for c in chunks if c.samples]
        return self.sampler.sample(
            logits,
            [c.request.params for c in sampled],
            [c.request.num_output_tokens for c in sampled],
        )

    def _metadata(self, out: SchedulerOutput, slots: list[int]) -> AttentionMetadata:
        dev = self.device
        dec, pre = out.decodes, out.prefills
        dec_lens = [c.start + 1 for c in dec]
        pre_qlens = [c.num_tokens for c in pre]
        pre_ctx = [c.start + c.num_tokens for c in pre]
        qstart = np.zeros(len(pre) + 1, dtype=np.int32)
        np.cumsum(pre_qlens, out=qstart[1:])
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_decode_tokens=len(dec),
            decode_block_tables=self._block_tables(dec, dec_lens),
            decode_context_lens=torch.tensor(dec_lens, dtype=torch.int32, device=dev),
            decode_context_lens_list=dec_lens,
            prefill_block_tables=self._block_tables(pre, pre_ctx),
            prefill_query_start_loc=torch.from_numpy(qstart).to(dev),
            prefill_context_lens=torch.tensor(pre_ctx, dtype=torch.int32, device=dev),
            prefill_query_lens_list=pre_qlens,
            prefill_context_lens_list=pre_ctx,
            block_size=self.block_size,
        )

    def _block_tables(self, chunks: list, lens: list[int]) -> torch.Tensor:
        """(B, max_blocks) int32 block ids covering each sequence's context, 0-padded."""
        if not chunks:
            return torch.zeros((0, 1), dtype=torch.int32, device=self.device)
        bs = self.block_size
        width = max(-(-n // bs) for n in lens)
        table = np.zeros((len(chunks), width), dtype=np.int32)
        for row, (chunk, n) in enumerate(zip(chunks, lens)):
            ids = [b.block_id for b in chunk.request.blocks[: -(-n // bs)]]
            table[row, : len(ids)] = ids
        return torch.from_numpy(table).to(self.device)

    # ----------------------------------------------------------- KV transfer
    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """(L, 2, n, block_size, H_kv, D) contiguous copy of the given blocks."""
        from kernels.kv_pack import gather_blocks  # noqa: PLC0415 - see the note on imports above

        return gather_blocks(self.kv_cache, block_ids)

    def write_blocks(self, block_ids: list[int], buffer: torch.Tensor) -> None:
        """Inverse of :meth:`read_blocks`."""
        from kernels.kv_pack import scatter_blocks  # noqa: PLC0415 - see the note on imports above

        scatter_blocks(self.kv_cache, block_ids, buffer)
