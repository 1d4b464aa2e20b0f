"""Figure 2: prefill throughput of a 4K-token prompt vs the bf16 GEMM peak.

FLOPs of a prefill: 2 x (non-embedding parameters) per token, plus causal attention
(2 matmuls of ~T^2/2 x D per head and layer). ``peak_fraction`` = achieved FLOP/s / the
FLOP/s of an 8192^3 bf16 matmul measured in the same run.

    python benchmarks/gpu/prefill_throughput.py [--prompt-len 4096] | --smoke
"""

from __future__ import annotations

import time

from common import (
    MODEL_CONFIGS, base_parser, build_model_dir, gemm_peak, make_engine, param_bytes,
    random_prompt, release_memory, setup, sync, write_results,
)


def prefill_flops(name: str, tokens: int) -> float:
    c = MODEL_CONFIGS[name]
    dense = param_bytes(name, 1) - c["vocab_size"] * c["hidden_size"] * (1 if c["tie_word_embeddings"] else 2)
    lm_head = 2 * c["vocab_size"] * c["hidden_size"]  # logits of the last token only
    attn = 4 * c["num_hidden_layers"] * c["num_attention_heads"] * c["head_dim"] * tokens * tokens / 2
    return 2 * dense * tokens + lm_head + attn


def ttft(eng, prompt: list[int], rid: str, device: str) -> float:
    """Seconds from add_request to the first generated token."""
    from engine import SamplingParams

    sync(device)
    t0 = time.perf_counter()
    eng.add_request(rid, prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    while True:
        outs = [o for o in eng.step() if o.request_id == rid and o.token_ids]
        if outs:
            break
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--prompt-len", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    env = setup(args)
    if args.smoke:
        args.prompt_len, args.repeats = 128, 2
    peak = gemm_peak(env["device"], env["dtype"])
    print(f"GEMM peak {peak / 1e12:.1f} TFLOP/s")
    rows = []
    for name in args.models:
        eng = make_engine(
            build_model_dir(name, env["device"], env["dtype"]), env, block_size=16,
            num_kv_blocks=(args.prompt_len // 16 + 2) * (args.repeats + 2),
            max_num_batched_tokens=args.prompt_len,  # the whole prompt in one step
        )
        vocab = MODEL_CONFIGS[name]["vocab_size"]
        ttft(eng, random_prompt(args.prompt_len, vocab, seed=99), "warmup", env["device"])
        # Distinct prompts: a prefix-cache hit would not be a prefill.
        times = sorted(
            ttft(eng, random_prompt(args.prompt_len, vocab, seed=i), f"p{i}", env["device"])
            for i in range(args.repeats)
        )
        t = times[len(times) // 2]
        flops = prefill_flops(name, args.prompt_len)
        row = dict(model=name, prompt_len=args.prompt_len, seconds=t, tokens_per_s=args.prompt_len / t,
                   tflops=flops / t / 1e12, peak_fraction=flops / t / peak)
        print(f"{name}: {row['tokens_per_s']:.0f} tok/s, {row['tflops']:.1f} TFLOP/s -> "
              f"{row['peak_fraction']:.2f} of GEMM peak")
        rows.append(row)
        del eng
        release_memory(env["device"])  # the next model needs this one's memory
    write_results("prefill_throughput", args, {**env, "gemm_peak_tflops": peak / 1e12}, rows)


if __name__ == "__main__":
    main()
