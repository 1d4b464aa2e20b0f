"""CUDA-graph decode on CPU: bucketing, padding, and the padded static forward.

The graphs themselves need a GPU (tests/engine/test_gpu_engine.py); everything around them
runs here: which batch sizes are captured, which one a batch replays, the padded inputs,
and the very forward that gets captured (static buffers, padding rows, fixed decode grid),
run eagerly under the Triton interpreter and compared with an unpadded forward.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

# Before anything imports triton (transformers does, when tiny models are built): Triton's
# standard library is interpreted only if the interpreter is on when it is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine import LLMEngine
from engine.attention import AttentionMetadata
from engine.attention.torch_backend import TorchAttentionBackend
from engine.config import EngineConfig
from engine.cuda_graph import (
    DecodeGraphRunner,
    graph_batch_sizes,
    pad_decode_batch,
    pick_graph_batch_size,
    use_cuda_graphs,
)
from engine.forward_context import ForwardContext
from engine.loader import load_model

BLOCK = 4


# ------------------------------------------------------------------ buckets
def test_default_batch_sizes_follow_the_documented_ladder() -> None:
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert graph_batch_sizes(64, 64) == graph_batch_sizes(1000, 64)


def test_batch_sizes_are_capped_at_256_and_reach_the_limit() -> None:
    assert graph_batch_sizes(1000, 1000) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    # A limit off the ladder is captured itself, so every schedulable batch has a graph.
    assert graph_batch_sizes(40, 64) == [1, 2, 4, 8, 16, 24, 32, 40]
    assert graph_batch_sizes(64, 20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes(3) == [1, 2, 3]
    assert graph_batch_sizes(1) == [1]


def test_batch_sizes_reject_non_positive_limits() -> None:
    with pytest.raises(ValueError):
        graph_batch_sizes(0)
    with pytest.raises(ValueError):
        graph_batch_sizes(8, 0)


@pytest.mark.parametrize(
    ("num_seqs", "expected"),
    [(1, 1), (2, 2), (3, 4), (5, 8), (8, 8), (9, 16), (17, 24), (25, 32), (33, 48), (49, 64), (64, 64), (65, None)],
)
def test_pick_smallest_graph_that_holds_the_batch(num_seqs: int, expected: int | None) -> None:
    assert pick_graph_batch_size(graph_batch_sizes(64), num_seqs) == expected


def test_pick_rejects_empty_batch() -> None:
    with pytest.raises(ValueError):
        pick_graph_batch_size([1, 2], 0)


def test_graphs_only_on_cuda_with_triton_and_not_eager() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert use_cuda_graphs(cuda, "triton", enforce_eager=False)
    assert not use_cuda_graphs(cuda, "triton", enforce_eager=True)
    assert not use_cuda_graphs(cuda, "torch", enforce_eager=False)
    assert not use_cuda_graphs(cuda, "flash_attn", enforce_eager=False)
    assert not use_cuda_graphs(cpu, "triton", enforce_eager=False)


# ------------------------------------------------------------------ padding
def test_padding_rows_skip_the_store_and_read_one_token_of_block_zero() -> None:
    p = pad_decode_batch(
        input_ids=[11, 12, 13],
        positions=[4, 0, 9],
        slot_mapping=[29, 12, 41],
        # Row 0 holds a reserved block past its context (dropped, as the eager path does).
        block_tables=[[5, 7, 3], [3], [2, 6, 10]],
        context_lens=[5, 1, 10],
        padded_batch=4,
        max_blocks_per_seq=4,
        block_size=BLOCK,
    )
    np.testing.assert_array_equal(p.input_ids, [11, 12, 13, 0])
    np.testing.assert_array_equal(p.positions, [4, 0, 9, 0])
    np.testing.assert_array_equal(p.slot_mapping, [29, 12, 41, -1])
    np.testing.assert_array_equal(p.context_lens, [5, 1, 10, 1])
    np.testing.assert_array_equal(
        p.block_tables,
        [[5, 7, 0, 0], [3, 0, 0, 0], [2, 6, 10, 0], [0, 0, 0, 0]],
    )
    assert p.input_ids.dtype == np.int64 and p.slot_mapping.dtype == np.int64
    assert p.block_tables.dtype == np.int32 and p.context_lens.dtype == np.int32


def test_padding_many_rows() -> None:
    n, size = 5, 8
    p = pad_decode_batch(
        list(range(1, n + 1)), [0] * n, list(range(n)), [[i] for i in range(n)], [1] * n,
        padded_batch=size, max_blocks_per_seq=2, block_size=BLOCK,
    )
    assert p.slot_mapping.tolist() == [0, 1, 2, 3, 4, -1, -1, -1]
    assert p.context_lens.tolist() == [1] * size
    assert p.block_tables[:, 0].tolist() == [0, 1, 2, 3, 4, 0, 0, 0]
    assert not p.block_tables[:, 1].any()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"padded_batch": 1}, "do not fit"),
        ({"context_lens": [9, 1]}, "table has 2"),  # 9 tokens need 3 blocks of 4
        ({"context_lens": [0, 1]}, ">= 1"),
        ({"max_blocks_per_seq": 1}, "graphs hold 1"),
        ({"positions": [1]}, "differ in length"),
    ],
)
def test_padding_rejects_inconsistent_batches(kwargs: dict, match: str) -> None:
    args = dict(
        input_ids=[1, 2], positions=[5, 0], slot_mapping=[5, 8], block_tables=[[1, 2], [2]],
        context_lens=[6, 1], padded_batch=2, max_blocks_per_seq=4, block_size=BLOCK,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pad_decode_batch(**args)


# ------------------------------------------------------------------ engine wiring
def test_engine_config_validates_graph_batch() -> None:
    assert EngineConfig().enforce_eager is False
    assert EngineConfig().cuda_graph_max_batch == 64
    with pytest.raises(ValueError, match="cuda_graph_max_batch"):
        EngineConfig(cuda_graph_max_batch=0)


def test_cpu_engine_runs_eagerly(tiny_model_dir) -> None:
    eng = LLMEngine.from_pretrained(str(tiny_model_dir("llama")), num_kv_blocks=16, enforce_eager=False)
    assert eng.runner.graph_runner is None


# ------------------------------------------------------------------ the captured forward
def random_decode_batch(num_seqs: int, num_blocks: int, max_blocks: int, seed: int):
    """Random decode sequences over distinct blocks (block 0 left to padding rows)."""
    rng = np.random.default_rng(seed)
    free = list(rng.permutation(np.arange(1, num_blocks)))
    ids, pos, slots, tables, lens = [], [], [], [], []
    for _ in range(num_seqs):
        ctx = int(rng.integers(1, max_blocks * BLOCK + 1))
        table = [int(free.pop()) for _ in range(-(-ctx // BLOCK))]
        ids.append(int(rng.integers(3, 300)))
        pos.append(ctx - 1)
        slots.append(table[(ctx - 1) // BLOCK] * BLOCK + (ctx - 1) % BLOCK)
        tables.append(table)
        lens.append(ctx)
    return ids, pos, slots, tables, lens


def reference_decode_hidden(model, kv_cache, ids, pos, slots, tables, lens) -> torch.Tensor:
    """Unpadded eager decode forward through the torch backend: (B, hidden)."""
    dev = kv_cache.device
    width = max(len(t) for t in tables)
    table = torch.zeros(len(tables), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        table[i, : len(t)] = torch.tensor(t)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=dev),
        num_decode_tokens=len(ids),
        decode_block_tables=table.to(dev),
        decode_context_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
        decode_context_lens_list=list(lens),
        prefill_block_tables=torch.zeros((0, 1), dtype=torch.int32, device=dev),
        prefill_query_start_loc=torch.zeros(1, dtype=torch.int32, device=dev),
        prefill_context_lens=torch.zeros(0, dtype=torch.int32, device=dev),
        prefill_query_lens_list=[],
        prefill_context_lens_list=[],
        block_size=BLOCK,
    )
    ctx = ForwardContext(
        kv_cache=kv_cache, attn_metadata=meta, backend=TorchAttentionBackend(),
        logits_indices=torch.zeros(0, dtype=torch.long, device=dev),
    )
    return model(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), ctx)


def random_kv_cache(cfg, num_blocks: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """(L, 2, num_blocks, BLOCK, H_kv, D) of random K/V: every cached token is distinct."""
    gen = torch.Generator().manual_seed(1)
    shape = (cfg.num_layers, 2, num_blocks, BLOCK, cfg.num_kv_heads, cfg.head_dim)
    return torch.randn(shape, generator=gen).to(dtype=dtype, device=device)


@torch.inference_mode()
def test_padded_static_forward_matches_unpadded_eager(tiny_model_dir, monkeypatch) -> None:
    """The forward the graphs capture, padded 3 -> 4 and 5 -> 8, equals the plain forward.

    Also pins that padding rows write no KV: after both forwards the caches are identical.
    """
    import triton.language as tl

    if type(tl.max).__name__ != "InterpretedFunction":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 (CUDA machine): see test_gpu_engine.py")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model, cfg = load_model(tiny_model_dir("llama"), dtype="float32", device="cpu")
    num_blocks, max_len = 64, 32
    kv = random_kv_cache(cfg, num_blocks, torch.float32, "cpu")
    runner = DecodeGraphRunner(model, kv, BLOCK, max_len, [1, 2, 4, 8])
    for n, seed in ((3, 0), (5, 1)):
        batch = random_decode_batch(n, num_blocks, max_len // BLOCK, seed)
        before = kv.clone()
        size = runner.prepare(*batch)
        assert size == {3: 4, 5: 8}[n]
        got = runner.forward_static(size)  # (size, hidden), writes into kv
        ref_kv = before.clone()
        want = reference_decode_hidden(model, ref_kv, *batch)
        assert got.shape == (size, cfg.hidden_size)
        torch.testing.assert_close(got[:n], want, atol=2e-5, rtol=2e-5)
        # The same slots changed (the real rows' new tokens, nothing for padding rows), to
        # the same values up to float rounding of the layers below.
        changed = (kv != before).flatten(3).any(-1)  # (L, 2, num_blocks, BLOCK)
        assert torch.equal(changed, (ref_kv != before).flatten(3).any(-1))
        assert changed[:, :, 0].sum() == 0, "a padding row wrote into block 0"
        assert int(changed.sum()) == n * cfg.num_layers * 2
        torch.testing.assert_close(kv, ref_kv, atol=2e-5, rtol=2e-5)
        assert torch.isfinite(got).all()


def test_static_buffers_are_padded_and_stale_rows_cleared(tiny_model_dir) -> None:
    model, cfg = load_model(tiny_model_dir("llama"), dtype="float32", device="cpu")
    kv = random_kv_cache(cfg, 16, torch.float32, "cpu")
    runner = DecodeGraphRunner(model, kv, BLOCK, 32, [1, 2, 4])
    runner.prepare([7, 8, 9, 10], [30, 3, 5, 6], [10, 11, 12, 13], [[1] * 8, [2], [3, 4], [5, 6]], [31, 4, 6, 7])
    size = runner.prepare([21, 22, 23], [0, 4, 1], [4, 8, 25], [[1], [5, 2], [6]], [1, 5, 2])
    assert size == 4
    assert runner.input_ids[:4].tolist() == [21, 22, 23, 0]
    assert runner.slot_mapping[:4].tolist() == [4, 8, 25, -1]
    assert runner.context_lens[:4].tolist() == [1, 5, 2, 1]
    # Row 0 held 8 blocks in the previous step: the rest of it must be zero now.
    assert runner.block_tables[:4].tolist() == [[1] + [0] * 7, [5, 2] + [0] * 6, [6] + [0] * 7, [0] * 8]
    with pytest.raises(ValueError, match="exceeds the largest graph"):
        runner.prepare([1] * 5, [0] * 5, [0] * 5, [[1]] * 5, [1] * 5)
    with pytest.raises(RuntimeError, match="CUDA"):
        runner.capture(show_progress=False)
