"""Every kernel launch our wrappers make, compiled for an H100 (sm_90) without a GPU.

The interpreter (all CI has) accepts kernels that the GPU compiler rejects or that cannot
launch on the device; this compiles the launches the wrappers really make, for the
shapes the engine really uses (Llama-3.1-8B: 32 query heads, 8 KV heads, head_dim 128,
bf16; the tiny fp32 test models), and checks what the device imposes: the cubin builds,
shared memory fits one SM, and the bf16 production kernels do not spill registers.
All launches compile in one child process (tests/kernels/gpu_compile.py).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from unittest import mock

import pytest
import torch

from tests.kernels.gpu_compile import (
    H100_MAX_SHARED_BYTES,
    CompiledInfo,
    aot_supported,
    compile_launches,
    recorded_launches,
)

pytestmark = pytest.mark.skipif(not aot_supported(), reason="triton without the NVIDIA backend or ptxas")

LLAMA = {"h": 32, "h_kv": 8, "d": 128, "bs": 16}  # Llama-3.1-8B attention
TINY = {"h": 4, "h_kv": 2, "d": 16, "bs": 4}  # the tiny models of tests/engine (GPU tests run them in fp32)
MQA8 = {"h": 8, "h_kv": 1, "d": 64, "bs": 16}
HD256 = {"h": 8, "h_kv": 1, "d": 256, "bs": 16}


def _paged(dtype, h, h_kv, d, bs, tokens, num_blocks=4):
    q = torch.zeros(tokens, h, d, dtype=dtype)
    kc = torch.zeros(num_blocks, bs, h_kv, d, dtype=dtype)
    return q, kc, torch.zeros_like(kc)


def _decode(dtype, shape, batch, max_context_len) -> Callable[[], None]:
    def run() -> None:
        from kernels.paged_decode import paged_decode

        q, kc, vc = _paged(dtype, **shape, tokens=batch)
        tables = torch.zeros(batch, 8, dtype=torch.int32)
        lens = torch.ones(batch, dtype=torch.int32)
        paged_decode(q, kc, vc, tables, lens, 1 / math.sqrt(shape["d"]), max_context_len=max_context_len)

    return run


def _prefill(dtype, shape) -> Callable[[], None]:
    def run() -> None:
        from kernels.prefill_attention import prefill_attention

        q, kc, vc = _paged(dtype, **shape, tokens=100)
        tables = torch.zeros(2, 8, dtype=torch.int32)
        qsl = torch.tensor([0, 40, 100], dtype=torch.int32)
        lens = torch.tensor([40, 90], dtype=torch.int32)
        prefill_attention(q, kc, vc, tables, qsl, lens, 0.1, max_query_len=60)

    return run


def _kv_pack() -> None:
    from kernels.kv_pack import gather_blocks_triton, scatter_blocks_triton

    cache = torch.zeros(2, 2, 6, LLAMA["bs"], LLAMA["h_kv"], LLAMA["d"], dtype=torch.bfloat16)
    buf = gather_blocks_triton(cache, [3, 1])
    scatter_blocks_triton(cache, [0, 5], buf)


DECODE, MERGE = "_paged_decode_kernel", "_merge_splits_kernel"
# name -> (what to run, the kernels it must launch, whether spills are an error)
SCENARIOS: dict[str, tuple[Callable[[], None], list[str], bool]] = {
    # Batch 64: one split per sequence, the kernel writes the output itself.
    "decode-llama-bf16-batch64": (_decode(torch.bfloat16, LLAMA, 64, 4096), [DECODE], True),
    # Batch 1 against a 128K bound: split 32 ways, then merged (the CUDA-graph grid).
    "decode-llama-bf16-split": (_decode(torch.bfloat16, LLAMA, 1, 131072), [DECODE, MERGE], True),
    "decode-tiny-fp32-split": (_decode(torch.float32, TINY, 4, 512), [DECODE, MERGE], False),
    "decode-mqa8-fp16-split": (_decode(torch.float16, MQA8, 2, 2048), [DECODE, MERGE], False),
    "prefill-llama-bf16": (_prefill(torch.bfloat16, LLAMA), ["_prefill_attention_kernel"], True),
    "prefill-tiny-fp32": (_prefill(torch.float32, TINY), ["_prefill_attention_kernel"], False),
    # 1 KB rows: the pipelined tiles would need ~320 KB of shared memory.
    "prefill-fp32-d256": (_prefill(torch.float32, HD256), ["_prefill_attention_kernel"], False),
    "kv-pack-llama-bf16": (_kv_pack, ["_kv_pack_kernel"] * 2, True),
}


@pytest.fixture(scope="module")
def compiled() -> dict[str, tuple[list[str], list[CompiledInfo]]]:
    """Every scenario's launches (names) and what compiling them for sm_90 gave."""
    recorded = {}
    # The interpreter flag makes the wrappers accept CPU tensors; nothing is launched.
    with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "1"}):
        for name, (run, _, _) in SCENARIOS.items():
            with recorded_launches() as launches:
                run()
            recorded[name] = launches
    flat = [launch for launches in recorded.values() for launch in launches]
    infos = iter(compile_launches(flat, capability=90))
    return {
        name: ([launch.name for launch in launches], [next(infos) for _ in launches])
        for name, launches in recorded.items()
    }


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_launches_compile_and_fit_an_h100(compiled, scenario):
    names, infos = compiled[scenario]
    _, expected_names, no_spills = SCENARIOS[scenario]
    assert names == expected_names
    for info in infos:
        print(info)
        assert info.shared_bytes <= H100_MAX_SHARED_BYTES, str(info)
        if no_spills:
            assert info.spill_bytes == 0, str(info)
