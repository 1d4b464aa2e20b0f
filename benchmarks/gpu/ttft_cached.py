"""Figure 5: time to first token of an 8K-token prompt, cold vs fully cached.

The same prompt twice: the second request finds every full block in the prefix cache
and recomputes only the last token. ``speedup`` = cold TTFT / cached TTFT.

    python benchmarks/gpu/ttft_cached.py [--prompt-len 8192] | --smoke
"""

from __future__ import annotations

from common import (
    MODEL_CONFIGS, base_parser, build_model_dir, make_engine, random_prompt, release_memory, setup, write_results,
)
from prefill_throughput import ttft


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--prompt-len", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    env = setup(args)
    if args.smoke:
        args.prompt_len, args.repeats = 256, 2
    rows = []
    for name in args.models:
        eng = make_engine(
            build_model_dir(name, env["device"], env["dtype"]), env, block_size=16,
            num_kv_blocks=(args.prompt_len // 16 + 2) * (args.repeats + 2),
            max_num_batched_tokens=min(args.prompt_len, 8192),
        )
        vocab = MODEL_CONFIGS[name]["vocab_size"]
        ttft(eng, random_prompt(args.prompt_len, vocab, seed=1000), "warmup", env["device"])
        cold, cached = [], []
        for i in range(args.repeats):
            prompt = random_prompt(args.prompt_len, vocab, seed=i)
            cold.append(ttft(eng, prompt, f"cold{i}", env["device"]))
            cached.append(ttft(eng, prompt, f"hit{i}", env["device"]))
        c, h = sorted(cold)[len(cold) // 2], sorted(cached)[len(cached) // 2]
        row = dict(model=name, prompt_len=args.prompt_len, cold_ms=c * 1e3, cached_ms=h * 1e3, speedup=c / h)
        print(f"{name}: cold {row['cold_ms']:.1f} ms, cached {row['cached_ms']:.1f} ms -> x{row['speedup']:.1f}")
        rows.append(row)
        del eng
        release_memory(env["device"])  # the next model needs this one's memory
    write_results("ttft_cached", args, env, rows)


if __name__ == "__main__":
    main()
