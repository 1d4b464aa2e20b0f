"""Prefill attention: the Triton kernel vs torch SDPA, i.e. what ``prefill_attention`` should pick.

Attention alone (one layer), bf16, with the attention shapes of each model, in three cases:

* ``fresh-1x4096``: one fresh 4096-token prompt;
* ``fresh-8x512``: 8 fresh prompts of 512 tokens in one step;
* ``cached-4096+4096``: 4096 new tokens over a 4096-token cached prefix.

``triton_ms`` is ``kernels/prefill_attention.py`` reading K/V from the paged cache, as the
``"triton"`` path runs it. For fresh prompts ``sdpa_ms`` is
``engine.attention.sdpa_prefill.sdpa_fresh_prefill`` on the dense new-token q/k/v, as the
``"sdpa"`` path runs it (copy into the output included). For the cached case the backend
always uses the kernel; ``sdpa_ms`` here asks whether it should not: the context is
gathered from the paged cache with ``kernels/paged_gather.py`` (``gather_ms``, included)
and attended with a bottom-right causal bias (query ``i`` sees keys ``0..P + i``).
Both outputs are compared before timing, so a wrong mask fails loudly.

Times are GPU times: CUDA events around each call, after an L2 flush that also keeps the
GPU busy while the host enqueues (so launch overhead is not counted), warmup first, median
reported. ``ratio`` = triton_ms / sdpa_ms (> 1: SDPA wins); ``tflops`` counts only the
causally visible query-key pairs.

    python benchmarks/gpu/prefill_attention_choice.py   # GPU: results/gpu_prefill_attention.json
    python benchmarks/gpu/prefill_attention_choice.py --smoke   # tiny shapes, CPU, Triton interpreted
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from common import MODEL_CONFIGS, base_parser, setup, time_fn, write_results

BLOCK_SIZE = 16  # the engine's default KV block size


def time_ms(fn: Callable[[], Any], device: str, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn``: GPU time by CUDA events on CUDA, wall time on CPU."""
    if device != "cuda":
        return time_fn(fn, device, warmup, iters) * 1e3
    for _ in range(warmup):
        fn()
    flush = torch.empty(512 << 20, dtype=torch.uint8, device=device)  # >> L2; ~0.2 ms to zero
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    torch.cuda.synchronize()
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return times[len(times) // 2]


def visible_pairs(query_lens: list[int], prefix_len: int) -> int:
    """Query-key pairs a causal prefill computes (each query sees the prefix and itself)."""
    return sum(q * prefix_len + q * (q + 1) // 2 for q in query_lens)


class Scenario:
    """Random q/k/v of one scenario, the new tokens' K/V already in a shuffled paged cache."""

    def __init__(self, query_lens: list[int], prefix_len: int, h: int, h_kv: int, d: int,
                 device: str, dtype: torch.dtype, seed: int = 0) -> None:
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.query_lens, self.prefix_len = query_lens, prefix_len
        self.context_lens = [q + prefix_len for q in query_lens]
        t = sum(query_lens)
        nblk = [math.ceil(c / BLOCK_SIZE) for c in self.context_lens]
        perm = torch.randperm(sum(nblk), generator=g)  # scattered blocks, as in a busy cache
        tables = torch.zeros(len(query_lens), max(nblk), dtype=torch.int32)
        used = 0
        for i, n in enumerate(nblk):
            tables[i, :n] = perm[used : used + n]
            used += n

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

        self.q, self.k, self.v = rand(t, h, d), rand(t, h_kv, d), rand(t, h_kv, d)  # (T, H(_kv), D)
        self.k_cache = rand(sum(nblk), BLOCK_SIZE, h_kv, d)  # prefix: noise stands for cached K/V
        self.v_cache = rand(sum(nblk), BLOCK_SIZE, h_kv, d)
        slots = [
            int(tables[i, p // BLOCK_SIZE]) * BLOCK_SIZE + p % BLOCK_SIZE
            for i, (q, c) in enumerate(zip(query_lens, self.context_lens))
            for p in range(c - q, c)
        ]
        slot_t = torch.tensor(slots, device=device)
        self.k_cache.view(-1, h_kv, d).index_copy_(0, slot_t, self.k)  # both paths store first
        self.v_cache.view(-1, h_kv, d).index_copy_(0, slot_t, self.v)
        self.block_tables = tables.to(device)
        self.query_start_loc = torch.tensor(
            [0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32, device=device
        )
        self.context_lens_t = torch.tensor(self.context_lens, dtype=torch.int32, device=device)
        self.out = torch.empty_like(self.q)
        self.scale = 1 / math.sqrt(d)

    def triton(self) -> torch.Tensor:  # (T, H, D)
        from kernels.prefill_attention import prefill_attention

        return prefill_attention(
            self.q, self.k_cache, self.v_cache, self.block_tables, self.query_start_loc,
            self.context_lens_t, self.scale, max_query_len=max(self.query_lens), out=self.out,
        )

    def sdpa_fresh(self) -> torch.Tensor:  # (T, H, D)
        from engine.attention.sdpa_prefill import sdpa_fresh_prefill

        return sdpa_fresh_prefill(self.q, self.k, self.v, self.query_lens, self.scale, self.out)

    def sdpa_over_cache(self) -> tuple[Callable[[], Any], Callable[[], torch.Tensor]]:
        """(gather only, gather + SDPA) for a single sequence over its cached prefix."""
        from torch.nn.attention.bias import causal_lower_right

        from kernels.paged_gather import gather_varlen, varlen_slots

        if len(self.query_lens) != 1:
            raise ValueError("the cached scenario is one sequence")
        qlen, ctx = self.query_lens[0], self.context_lens[0]
        # Slots are per step, shared by every layer: computed once, outside the timing.
        slots = varlen_slots(self.block_tables, self.context_lens, BLOCK_SIZE)  # (C,)
        bias = causal_lower_right(qlen, ctx)  # query i at position P + i sees keys 0..P + i
        gqa = self.q.shape[1] != self.k.shape[1]

        def gather() -> tuple[torch.Tensor, torch.Tensor]:
            return gather_varlen(self.k_cache, slots), gather_varlen(self.v_cache, slots)  # (C, H_kv, D)

        def run() -> torch.Tensor:
            keys, vals = gather()
            qt = self.q.transpose(0, 1).unsqueeze(0)  # (1, H, Q, D)
            kt, vt = (x.transpose(0, 1).unsqueeze(0) for x in (keys, vals))  # (1, H_kv, C, D)
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=bias, scale=self.scale, enable_gqa=gqa)
            self.out.copy_(o[0].transpose(0, 1))
            return self.out

        return gather, run


def flash_eligible(c: Scenario) -> bool | None:
    """Whether torch's flash SDPA kernel accepts these inputs (None: cannot tell here)."""
    if c.q.device.type != "cuda":
        return None
    try:
        from torch.backends.cuda import SDPAParams, can_use_flash_attention

        qt = c.q[: c.query_lens[0]].transpose(0, 1).unsqueeze(0)
        kt = c.k[: c.query_lens[0]].transpose(0, 1).unsqueeze(0)
        params = SDPAParams(qt, kt, kt, None, 0.0, True, qt.shape[1] != kt.shape[1])
        return bool(can_use_flash_attention(params))
    except (ImportError, TypeError, RuntimeError):  # SDPAParams' signature moves between versions
        return None


def measure(name: str, label: str, c: Scenario, device: str, warmup: int, iters: int, atol: float) -> dict[str, Any]:
    """Check both paths agree, then time them; one result row."""
    from engine.attention.triton_backend import TritonAttentionBackend

    cfg = MODEL_CONFIGS[name]
    row: dict[str, Any] = {
        "model": name, "case": label, "num_seqs": len(c.query_lens), "query_len": c.query_lens[0],
        "prefix_len": c.prefix_len, "num_heads": cfg["num_attention_heads"],
        "num_kv_heads": cfg["num_key_value_heads"], "head_dim": cfg["head_dim"],
    }
    # What the backend runs with prefill_attention="auto" on CUDA: the kernel over a cached
    # prefix whatever the choice, the resolved path for fresh prompts.
    auto = TritonAttentionBackend().resolved_prefill_attention(torch.device("cuda"))
    row["auto_on_cuda_runs"] = "triton" if c.prefix_len else auto
    want = c.triton().float().clone()
    row["triton_ms"] = time_ms(c.triton, device, warmup, iters)
    flops = 4 * row["num_heads"] * row["head_dim"] * visible_pairs(c.query_lens, c.prefix_len)
    row["triton_tflops"] = flops / row["triton_ms"] / 1e9
    row.update(sdpa_ms=None, gather_ms=None, sdpa_tflops=None, ratio=None, winner="triton", sdpa_error=None)
    try:
        if c.prefix_len:
            gather, sdpa = c.sdpa_over_cache()
        else:
            gather, sdpa = None, c.sdpa_fresh
        got = sdpa()
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
        # A torch build whose SDPA refuses these inputs: report the kernel alone.
        row["sdpa_error"] = f"{type(exc).__name__}: {exc}"
        print(f"{name} {label}: SDPA failed, kernel only ({row['sdpa_error']})")
        return row
    diff = (got.float() - want).abs().max().item()
    row["max_abs_diff"] = diff
    if not diff <= atol:  # a wrong mask or offset is a bug here, not a result (also catches NaN)
        raise RuntimeError(f"{name} {label}: Triton and SDPA disagree (max abs diff {diff:.3g})")
    row["sdpa_ms"] = time_ms(sdpa, device, warmup, iters)
    row["gather_ms"] = time_ms(gather, device, warmup, iters) if gather else 0.0
    row["sdpa_tflops"] = flops / row["sdpa_ms"] / 1e9
    row["ratio"] = row["triton_ms"] / row["sdpa_ms"]
    row["winner"] = "sdpa" if row["ratio"] > 1 else "triton"
    row["sdpa_flash_eligible"] = flash_eligible(c)
    return row


def _fmt(x: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.{digits}f}"


def print_table(rows: list[dict[str, Any]], smoke: bool) -> None:
    head = (f"{'model':<14} {'case':<18} {'triton ms':>10} {'sdpa ms':>9} {'gather ms':>9} "
            f"{'ratio':>6}  winner  auto (CUDA)")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<14} {r['case']:<18} {_fmt(r['triton_ms'], 10, 3)} {_fmt(r['sdpa_ms'], 9, 3)} "
              f"{_fmt(r['gather_ms'], 9, 3)} {_fmt(r['ratio'], 6, 2)}  {r['winner']:<6}  {r['auto_on_cuda_runs']}")
    print("ratio = triton ms / sdpa ms (> 1: SDPA faster); sdpa ms of cached cases includes gather ms")
    if smoke:
        print("smoke run (CPU, interpreted kernel): the timings say nothing about the choice")
        return
    fresh = [r for r in rows if r["prefix_len"] == 0]
    agree = all(r["winner"] == r["auto_on_cuda_runs"] for r in fresh)
    print(f"prefill_attention='auto' on this GPU, fresh prompts: {'right' if agree else 'WRONG for some cases'}")


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--prompt-len", type=int, default=4096, help="the single fresh prompt")
    p.add_argument("--num-short", type=int, default=8, help="fresh short prompts in one step")
    p.add_argument("--short-len", type=int, default=512)
    p.add_argument("--prefix-len", type=int, default=4096, help="cached prefix of the cached case")
    p.add_argument("--new-len", type=int, default=4096, help="new tokens over the cached prefix")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    env = setup(args)
    env.pop("backend")  # attention only: no engine backend involved
    if args.smoke:
        # The kernel runs in Triton's CPU interpreter (fp32: the interpreter gets bf16 wrong).
        os.environ["TRITON_INTERPRET"] = "1"
        args.prompt_len, args.num_short, args.short_len = 64, 4, 16
        args.prefix_len, args.new_len, args.warmup, args.iters = 32, 32, 1, 2
    device, dtype = env["device"], getattr(torch, env["dtype"])
    atol = 1e-4 if dtype == torch.float32 else 2e-2
    cases = [
        (f"fresh-1x{args.prompt_len}", [args.prompt_len], 0),
        (f"fresh-{args.num_short}x{args.short_len}", [args.short_len] * args.num_short, 0),
        (f"cached-{args.prefix_len}+{args.new_len}", [args.new_len], args.prefix_len),
    ]
    rows = []
    for name in args.models:
        cfg = MODEL_CONFIGS[name]
        for label, qlens, prefix in cases:
            c = Scenario(qlens, prefix, cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"],
                     device, dtype)
            rows.append(measure(name, label, c, device, args.warmup, args.iters, atol))
            del c
    print_table(rows, args.smoke)
    write_results("gpu_prefill_attention", args, env, rows)


if __name__ == "__main__":
    main()
