"""Fused Triton kernels vs the torch ops they replace: residual-add + RMSNorm, q/k norm, RoPE.

Llama-3.1-8B shapes in bf16 (hidden 4096, 32 q heads, 8 KV heads, head_dim 128) at
T = 1, 64, 4096 tokens per step; q/k are strided views of a fused QKV output, as in the
model. The baseline is the engine's own torch path (``RMSNorm`` / ``rotate_qk`` with
``fused=False``), the candidate the same call with ``fused=True``, so ``speedup`` (torch
time / fused time, > 1 = the kernel pays off) is what ``fused_kernels`` buys per op and
layer. Llama has no q/k norm; ``qk_norm`` (Qwen3's) is timed at the same head shapes.

Two timings, medians over CUDA events:

* ``eager``: events around each call, so the CPU launch cost counts (one Triton launch
  against several torch ops): what prefill and eager decode steps pay.
* ``graph``: the op captured ``--graph-reps`` times in one CUDA graph, replayed: GPU time
  only, what a CUDA-graph decode step pays.

``fused_copy_fraction`` = the fused kernel's bytes moved (read + written) per second /
the device-to-device copy bandwidth measured in this run. ``max_abs_diff`` compares the
fused output with the torch one (a sanity check, not a tolerance).

    python benchmarks/gpu/fused_ops.py                 # on a GPU machine
    python benchmarks/gpu/fused_ops.py --smoke         # tiny shapes on CPU (Triton interpreter)
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common import MODEL_CONFIGS, copy_bandwidth, setup, time_fn, write_results

Op = Callable[[bool], Any]  # fused? -> output(s)


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def time_eager(fn: Callable[[], Any], device: str, warmup: int, iters: int) -> float:
    """Median seconds per call, CUDA events around each call (launch overhead included)."""
    if device != "cuda":
        return time_fn(fn, device, warmup, iters)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return median(times)


def time_graph(fn: Callable[[], Any], reps: int, warmup: int, iters: int) -> float:
    """Median seconds per call of ``fn`` captured ``reps`` times in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up off the default stream, as capture requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    return median(times)


def build_ops(
    t: int, shapes: dict[str, Any], device: str, dtype: torch.dtype
) -> tuple[dict[str, tuple[Op, int]], torch.Tensor]:
    """Op name -> (callable taking ``fused``, bytes the fused kernel reads + writes), and
    the residual stream the ``add_rms_norm`` op updates in place."""
    from engine.models.layers import RMSNorm
    from engine.models.rotary import RotaryEmbedding, rotate_qk

    hidden, h, h_kv, d = shapes["hidden_size"], shapes["num_attention_heads"], shapes["num_key_value_heads"], shapes["head_dim"]
    eps, size = shapes["rms_norm_eps"], torch.tensor([], dtype=dtype).element_size()
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    def norm(n: int) -> RMSNorm:
        m = RMSNorm(n, eps, dtype, device)
        m.weight.copy_(1.0 + 0.1 * randn(n))  # the parameter starts uninitialised
        return m

    x, residual, post_norm = randn(t, hidden), randn(t, hidden), norm(hidden)
    qkv = randn(t, (h + 2 * h_kv) * d)  # the fused projection output the model slices
    q = qkv[:, : h * d].view(t, h, d)  # (T, H, D), strided
    k = qkv[:, h * d : (h + h_kv) * d].view(t, h_kv, d)  # (T, H_kv, D), strided
    q_norm, k_norm = norm(d), norm(d)
    rope = RotaryEmbedding(d, shapes["rope_theta"], {}, device)
    cos, sin = rope.cos_sin(torch.arange(t, device=device) * 7, dtype)  # (T, 1, D/2)
    heads = t * (h + h_kv) * d
    return {
        # residual += x in place; values random-walk over the iterations, harmlessly.
        "add_rms_norm": (lambda f: post_norm.add_and_norm(x, residual, fused=f)[0], (4 * t * hidden + hidden) * size),
        "qk_norm": (lambda f: (q_norm(q, fused=f), k_norm(k, fused=f)), (2 * heads + 2 * d) * size),
        "rotary": (lambda f: rotate_qk(q, k, cos, sin, fused=f), (2 * heads + t * d) * size),
    }, residual


def max_abs_diff(a: Any, b: Any) -> float:
    pairs = zip(a, b) if isinstance(a, tuple) else [(a, b)]
    return max((x.float() - y.float()).abs().max().item() for x, y in pairs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (Triton interpreter): check the script runs")
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 64, 4096], help="T values (tokens per step)")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--graph-reps", type=int, default=20, help="op copies per CUDA graph")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default results/gpu_fused_ops.json)")
    args = p.parse_args()
    env = setup(args)
    model = "llama-3.1-8b"
    if args.smoke:
        # Before the first launch (lazy_jit picks the mode then): the kernels interpret on CPU.
        os.environ["TRITON_INTERPRET"] = "1"
        model, args.tokens, args.iters = "tiny", [1, 8], 3
    env.pop("backend")  # no attention here
    device, dtype = env["device"], getattr(torch, env["dtype"])
    shapes = MODEL_CONFIGS[model]
    bw = copy_bandwidth(device)
    print(f"{model} shapes, {env['dtype']} on {device}; copy bandwidth {bw / 1e9:.1f} GB/s")
    rows = []
    with torch.inference_mode():
        for t in args.tokens:
            ops, residual = build_ops(t, shapes, device, dtype)
            for op, (fn, nbytes) in ops.items():
                # Both paths from the same residual (add_rms_norm updates it); also compiles.
                before = residual.clone()
                fused_out = fn(True)
                residual.copy_(before)
                diff = max_abs_diff(fused_out, fn(False))
                row: dict[str, Any] = {"op": op, "tokens": t, "max_abs_diff": diff}
                for mode in ("eager", "graph"):
                    if mode == "graph" and device != "cuda":
                        continue  # no graphs on CPU: the smoke run skips them
                    for impl, fused in (("torch", False), ("fused", True)):
                        call = functools.partial(fn, fused)
                        s = (
                            time_eager(call, device, warmup=10, iters=args.iters)
                            if mode == "eager"
                            else time_graph(call, args.graph_reps, warmup=3, iters=max(args.iters // 10, 5))
                        )
                        row[f"{mode}_{impl}_us"] = s * 1e6
                    row[f"{mode}_speedup"] = row[f"{mode}_torch_us"] / row[f"{mode}_fused_us"]
                best_fused_s = min(row[f"{m}_fused_us"] for m in ("eager", "graph") if f"{m}_fused_us" in row) / 1e6
                row["fused_gb_s"] = nbytes / best_fused_s / 1e9
                row["fused_copy_fraction"] = nbytes / best_fused_s / bw
                rows.append(row)
    print_table(rows)
    write_results("gpu_fused_ops", args, {**env, "model_shapes": model, "copy_bandwidth_gb_s": bw / 1e9}, rows)


def print_table(rows: list[dict[str, Any]]) -> None:
    """One line per (op, T): times in microseconds and torch/fused speedups."""
    head = f"{'op':<13}{'T':>6} | {'eager torch':>11}{'fused':>9}{'speedup':>9} | {'graph torch':>11}{'fused':>9}{'speedup':>9} | {'GB/s':>7}"
    print(head)
    print("-" * len(head))

    def cell(row: dict[str, Any], key: str, width: int) -> str:
        if key not in row:
            return f"{'-':>{width}}"  # no graphs on CPU
        text = f"{row[key]:.2f}x" if key.endswith("speedup") else f"{row[key]:.1f}"
        return f"{text:>{width}}"

    for r in rows:
        eager = cell(r, "eager_torch_us", 11) + cell(r, "eager_fused_us", 9) + cell(r, "eager_speedup", 9)
        graph = cell(r, "graph_torch_us", 11) + cell(r, "graph_fused_us", 9) + cell(r, "graph_speedup", 9)
        print(f"{r['op']:<13}{r['tokens']:>6} | {eager} | {graph} | {r['fused_gb_s']:>7.1f}")


if __name__ == "__main__":
    main()
