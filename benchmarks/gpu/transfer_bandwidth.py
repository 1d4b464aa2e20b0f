"""Figure 4: gather/scatter of KV blocks and cuda_ipc transfer, GB/s vs copy bandwidth.

Gather packs ``n`` scattered blocks of every layer of a Llama-3.1-8B-shaped KV cache into
one contiguous buffer (what a prefill replica sends); scatter unpacks it (the decode
side). Both are timed for the Triton kernels and the torch ``index_select`` /
``index_copy_`` references. The cuda_ipc figure moves a packed buffer to a second process
on the same GPU (CUDA IPC handle through ``torch.multiprocessing``) which copies it into
its own memory. ``copy_fraction`` = achieved GB/s (bytes read + written) / the
device-to-device copy bandwidth measured in this run.

    python benchmarks/gpu/transfer_bandwidth.py [--num-blocks 256] | --smoke
"""

from __future__ import annotations

import time

import torch
import torch.multiprocessing as mp

from common import MODEL_CONFIGS, base_parser, copy_bandwidth, setup, sync, time_fn, write_results


def _ipc_receiver(queue: mp.Queue, done: mp.Queue, iters: int) -> None:
    """Second process: receive buffers by IPC handle, copy each into local memory."""
    local = None
    for _ in range(iters):
        shared = queue.get()  # a CUDA tensor rebuilt from the sender's IPC handle
        if local is None:
            local = torch.empty_like(shared)
        local.copy_(shared)
        torch.cuda.synchronize()
        del shared
        done.put(True)


def ipc_bandwidth(buffer: torch.Tensor, iters: int) -> float:
    """Bytes/s (read + write) of handing ``buffer`` to another process and copying it there."""
    ctx = mp.get_context("spawn")
    queue, done = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_ipc_receiver, args=(queue, done, iters + 1))
    proc.start()
    try:
        queue.put(buffer)  # warm-up: opens the IPC handle once
        done.get(timeout=120)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            queue.put(buffer)
            done.get(timeout=120)
        elapsed = time.perf_counter() - t0
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    return 2 * buffer.numel() * buffer.element_size() * iters / elapsed


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--num-blocks", nargs="+", type=int, default=[16, 256, 1024])
    p.add_argument("--cache-blocks", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=16)
    args = p.parse_args()
    env = setup(args)
    if args.smoke:
        args.num_blocks, args.cache_blocks = [4, 16], 64
    from kernels.kv_pack import (
        gather_blocks_reference, gather_blocks_triton, scatter_blocks_reference, scatter_blocks_triton,
    )

    dev, dtype = env["device"], getattr(torch, env["dtype"])
    cfg = MODEL_CONFIGS[args.models[0] if args.smoke else "llama-3.1-8b"]
    shape = (cfg["num_hidden_layers"], 2, args.cache_blocks, args.block_size,
             cfg["num_key_value_heads"], cfg["head_dim"])
    cache = torch.randn(shape, device=dev, dtype=dtype)
    bw = copy_bandwidth(dev)
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s; cache {cache.numel() * cache.element_size() / 1e9:.1f} GB")
    impls = {"torch": (gather_blocks_reference, scatter_blocks_reference)}
    if dev == "cuda":
        impls["triton"] = (gather_blocks_triton, scatter_blocks_triton)
    rows = []
    for n in args.num_blocks:
        ids = torch.randperm(args.cache_blocks)[:n].to(dev)
        nbytes = 2 * cache[:, :, :n].numel() * cache.element_size()  # read + written
        for impl, (gather, scatter) in impls.items():
            buf = gather(cache, ids)
            for op, fn in (("gather", lambda: gather(cache, ids)), ("scatter", lambda: scatter(cache, ids, buf))):
                t = time_fn(fn, dev)
                rows.append(dict(op=op, impl=impl, num_blocks=n, gb_s=nbytes / t / 1e9, copy_fraction=nbytes / t / bw))
                print(f"{op:8s} {impl:6s} n={n:5d}: {nbytes / t / 1e9:7.1f} GB/s -> {nbytes / t / bw:.2f} of copy")
        if dev == "cuda":
            rate = ipc_bandwidth(impls["triton"][0](cache, ids), iters=10)
            rows.append(dict(op="cuda_ipc", impl="torch.multiprocessing", num_blocks=n,
                             gb_s=rate / 1e9, copy_fraction=rate / bw))
            print(f"cuda_ipc        n={n:5d}: {rate / 1e9:7.1f} GB/s -> {rate / bw:.2f} of copy")
    sync(dev)
    write_results("transfer_bandwidth", args, {**env, "copy_bandwidth_gb_s": bw / 1e9}, rows)


if __name__ == "__main__":
    main()
