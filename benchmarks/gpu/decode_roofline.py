"""Figure 1: decode step time at batch 1/16/64 and context 1K/4K vs the HBM roofline.

A decode step must read every weight once (the input embedding table only for its
batch's rows) plus the whole KV context of every sequence; the roofline is those bytes
divided by the device-to-device copy bandwidth measured in this run.
``roofline_fraction`` = roofline time / measured step time (1.0 = at the limit).

    python benchmarks/gpu/decode_roofline.py               # on a GPU machine
    python benchmarks/gpu/decode_roofline.py --smoke       # tiny model on CPU
"""

from __future__ import annotations

import time

from common import (
    MODEL_CONFIGS, base_parser, build_model_dir, copy_bandwidth, decode_weight_bytes, kv_bytes_per_token,
    make_engine, random_prompt, release_memory, setup, sync, write_results,
)

# Decode steps run untimed once every sequence decodes (CUDA graphs replay from then on).
WARMUP_STEPS = 3


def max_new_tokens(batch: int, context: int, steps: int, step_budget: int) -> int:
    """Tokens a request may generate before the timed steps end.

    The first sequences finish prefilling long before the last (chunked prefill fills one
    step's token budget at a time) and decode meanwhile, one token per step: capping them
    at ``steps`` would let them finish during the timed steps and shrink the batch.
    """
    prefill_steps = -(-batch * context // max(1, step_budget - batch)) + 2
    return prefill_steps + WARMUP_STEPS + steps + 8


def measure(eng, batch: int, context: int, steps: int, vocab: int, device: str, step_budget: int) -> float:
    """Median wall time of one engine step once all ``batch`` sequences are decoding."""
    from engine import SamplingParams

    params = SamplingParams(
        max_tokens=max_new_tokens(batch, context, steps, step_budget), temperature=0.0, ignore_eos=True
    )
    for i in range(batch):
        eng.add_request(f"r{i}", random_prompt(context, vocab, seed=i), params)
    # Prefill everything first (chunked); a step is pure decode once each has a token.
    produced: set[str] = set()
    while len(produced) < batch:
        for out in eng.step():
            if out.token_ids:
                produced.add(out.request_id)
    for _ in range(WARMUP_STEPS):  # warm up decode shapes (and CUDA graphs, if the engine captures)
        eng.step()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        outs = eng.step()
        sync(device)
        times.append(time.perf_counter() - t0)
        # Every sequence still decoding: the step measured is a batch-``batch`` step.
        if len(outs) != batch or any(o.finished for o in outs):
            raise RuntimeError(f"decode step produced {len(outs)} outputs for a batch of {batch}")
    for i in range(batch):
        eng.abort(f"r{i}")
    while eng.has_unfinished_requests():
        eng.step()
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    p.add_argument("--contexts", nargs="+", type=int, default=[1024, 4096])
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    env = setup(args)
    if args.smoke:
        args.batches, args.contexts, args.steps = [1, 4], [64], 4
    step_budget = 8192 if not args.smoke else 256
    bw = copy_bandwidth(env["device"])
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s")
    rows = []
    for name in args.models:
        model_dir = build_model_dir(name, env["device"], env["dtype"])
        # KV blocks of the largest case: every sequence's context plus what it may generate.
        blocks = max(
            -(-(c + max_new_tokens(b, c, args.steps, step_budget)) // 16) * b
            for b in args.batches for c in args.contexts
        )
        eng = make_engine(
            model_dir, env, block_size=16, num_kv_blocks=blocks + 64,
            max_num_seqs=max(args.batches), max_num_batched_tokens=step_budget,
        )
        vocab = MODEL_CONFIGS[name]["vocab_size"]
        dtype_bytes = 2 if env["dtype"] != "float32" else 4
        for batch in args.batches:
            for context in args.contexts:
                step_s = measure(eng, batch, context, args.steps, vocab, env["device"], step_budget)
                nbytes = decode_weight_bytes(name, dtype_bytes) + batch * context * kv_bytes_per_token(name, dtype_bytes)
                # bw counts the copy's reads plus writes, i.e. total HBM traffic per second.
                roofline_s = nbytes / bw
                row = dict(model=name, batch=batch, context=context, step_ms=step_s * 1e3,
                           roofline_ms=roofline_s * 1e3, roofline_fraction=roofline_s / step_s,
                           tokens_per_s=batch / step_s)
                print(f"{name} B={batch} ctx={context}: {row['step_ms']:.2f} ms/step, "
                      f"roofline {row['roofline_ms']:.2f} ms -> ratio {row['roofline_fraction']:.2f}")
                rows.append(row)
        del eng
        release_memory(env["device"])  # the next model needs this one's weights and KV freed
    write_results("decode_roofline", args, {**env, "copy_bandwidth_gb_s": bw / 1e9}, rows)


if __name__ == "__main__":
    main()
