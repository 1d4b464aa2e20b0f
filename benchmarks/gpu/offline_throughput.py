"""Figure 3: offline generation throughput vs transformers ``generate``, 32 requests.

Both sides get the same 32 random prompts (equal length, so HF needs no padding) and
generate exactly ``--output-len`` tokens greedily. ``speedup`` = engine output tokens/s
/ transformers output tokens/s, both measured here on the same device.

    python benchmarks/gpu/offline_throughput.py [--num-requests 32] | --smoke
"""

from __future__ import annotations

import time

import torch

from common import (
    MODEL_CONFIGS, base_parser, build_model_dir, make_engine, random_prompt, release_memory, setup, sync,
    write_results,
)


def engine_throughput(model_dir, env, prompts: list[list[int]], output_len: int) -> float:
    from engine import SamplingParams

    eng = make_engine(
        model_dir, env, block_size=16, max_num_seqs=len(prompts), max_num_batched_tokens=4096,
        num_kv_blocks=len(prompts) * ((len(prompts[0]) + output_len) // 16 + 2) + 64,
    )
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    eng.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm-up
    sync(env["device"])
    t0 = time.perf_counter()
    outs = eng.generate(prompts, params)
    sync(env["device"])
    elapsed = time.perf_counter() - t0
    if any(len(o.token_ids) != output_len for o in outs):
        raise RuntimeError("engine stopped early despite ignore_eos")
    del eng
    release_memory(env["device"])  # transformers loads the same weights next, on the same GPU
    return len(prompts) * output_len / elapsed


def hf_throughput(model_dir, env, prompts: list[list[int]], output_len: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, env["dtype"])).to(env["device"])
    ids = torch.tensor(prompts, device=env["device"])  # (B, T): equal lengths, no padding
    kw = dict(do_sample=False, max_new_tokens=output_len, min_new_tokens=output_len, pad_token_id=0)
    model.generate(ids[:2], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
    sync(env["device"])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, **kw)
    sync(env["device"])
    elapsed = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + output_len
    del model, out
    release_memory(env["device"])
    return len(prompts) * output_len / elapsed


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    args = p.parse_args()
    env = setup(args)
    if args.smoke:
        args.num_requests, args.prompt_len, args.output_len = 4, 32, 8
    rows = []
    for name in args.models:
        model_dir = build_model_dir(name, env["device"], env["dtype"])
        vocab = MODEL_CONFIGS[name]["vocab_size"]
        prompts = [random_prompt(args.prompt_len, vocab, seed=i) for i in range(args.num_requests)]
        ours = engine_throughput(model_dir, env, prompts, args.output_len)
        theirs = hf_throughput(model_dir, env, prompts, args.output_len)
        row = dict(model=name, num_requests=args.num_requests, prompt_len=args.prompt_len,
                   output_len=args.output_len, engine_tok_s=ours, hf_generate_tok_s=theirs,
                   speedup=ours / theirs)
        print(f"{name}: engine {ours:.0f} tok/s, transformers {theirs:.0f} tok/s -> x{row['speedup']:.2f}")
        rows.append(row)
    write_results("offline_throughput", args, env, rows)


if __name__ == "__main__":
    main()
