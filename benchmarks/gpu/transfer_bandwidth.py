"""Figure 4: gather/scatter of KV blocks and cuda_ipc transfer, GB/s vs copy bandwidth.

Gather packs ``n`` scattered blocks of every layer of a Llama-3.1-8B-shaped KV cache into
one contiguous buffer (what a prefill replica sends); scatter unpacks it (the decode
side). Both are timed for the Triton kernels and the torch ``index_select`` /
``index_copy_`` references. The transfer figure moves a packed buffer to a second process
through kvferry's own transport, chosen as in serving: cuda_ipc on one GPU (the receiver
copies it device-to-device into its own memory), gloo in ``--smoke``. ``copy_fraction`` = achieved GB/s (bytes read + written) / the
device-to-device copy bandwidth measured in this run.

    python benchmarks/gpu/transfer_bandwidth.py [--num-blocks 256] | --smoke
"""

from __future__ import annotations

import time

import torch
import torch.multiprocessing as mp

from common import MODEL_CONFIGS, base_parser, copy_bandwidth, setup, sync, time_fn, write_results


def _transport_receiver(device: str, endpoints: mp.Queue, jobs: mp.Queue, done: mp.Queue) -> None:
    """Second process: a decode-side kvferry transport receiving each posted transfer."""
    from cluster.transport import dtype_from_str, make_auto_transport

    torch.set_num_threads(1)
    transport = make_auto_transport("auto", "bench-decode", device=device, connect_timeout_s=60, transfer_timeout_s=60)
    endpoints.put(transport.listen())
    while (job := jobs.get(timeout=300)) is not None:
        transfer_id, (group_id, shape, dtype, backend) = job
        transport.recv(group_id, transfer_id, shape, dtype_from_str(dtype), 60.0, backend or None)
        if device == "cuda":
            torch.cuda.synchronize()
        done.put(True)
    done.get(timeout=60)  # the sender's last handle has completed: safe to tear down
    transport.close()


def transport_bandwidth(buffer: torch.Tensor, iters: int) -> tuple[str, float]:
    """(backend, bytes/s read + written) of kvferry's transport moving ``buffer`` to a second process.

    The same code path as serving: ``make_auto_transport`` on both sides, so on one GPU
    the sender must pick cuda_ipc (the receiver copies device-to-device into its own
    memory); on CPU (``--smoke``) it is gloo. Each transfer is timed from send to the
    sender's handle completing (the receiver acknowledged its copy).
    """
    from cluster.transport import make_auto_transport

    device = buffer.device.type
    ctx = mp.get_context("spawn")
    endpoints, jobs, done = ctx.Queue(), ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_transport_receiver, args=(device, endpoints, jobs, done))
    proc.start()
    sender = make_auto_transport("auto", "bench-prefill", device=device, connect_timeout_s=60, transfer_timeout_s=60)
    try:
        endpoint = endpoints.get(timeout=120)
        backend, elapsed = "", 0.0
        for i in range(iters + 1):  # transfer 0 warms up: pairing, IPC handle opening
            sync(device)
            t0 = time.perf_counter()
            handle = sender.send(endpoint, i, buffer)
            r = handle.result
            jobs.put((i, (r.group_id, r.shape, r.dtype, r.backend)))
            handle.wait(60.0)
            done.get(timeout=120)
            if i:
                elapsed += time.perf_counter() - t0
            backend = r.backend
        jobs.put(None)
        done.put(True)
        proc.join(timeout=60)
    finally:
        if proc.is_alive():
            proc.kill()
        sender.close()
    return backend, 2 * buffer.numel() * buffer.element_size() * iters / elapsed


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
        backend, rate = transport_bandwidth(impls["triton" if dev == "cuda" else "torch"][0](cache, ids), iters=10)
        rows.append(dict(op="transfer", impl=f"kvferry {backend}", num_blocks=n,
                         gb_s=rate / 1e9, copy_fraction=rate / bw))
        print(f"transfer {backend:6s} n={n:5d}: {rate / 1e9:7.1f} GB/s -> {rate / bw:.2f} of copy")
    sync(dev)
    write_results("transfer_bandwidth", args, {**env, "copy_bandwidth_gb_s": bw / 1e9}, rows)


if __name__ == "__main__":
    main()
