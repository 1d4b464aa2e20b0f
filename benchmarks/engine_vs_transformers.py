"""Engine throughput and TTFT vs transformers ``generate`` on the same weights, same run.

Workloads (default model, fp32, greedy, CPU unless --device):
  (a) 16 requests x (128 prompt tokens, 64 generated, ignore_eos)   target >= 1.25x
  (b) 32 requests, 128 prompt tokens, generated lengths spread 8..256 target >= 2x
      (transformers batches statically, so it runs every row to the longest length;
      both sides are credited only the tokens each request asked for)
  (c) time to first token of a 1,024-token prompt, cold vs fully cached (target >= 5x)

Prints a table with the ratios and writes JSON to --out (default results/engine_bench.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import time
from pathlib import Path

import torch

from engine import LLMEngine, SamplingParams


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


@torch.inference_mode()
def _hf_generate(hf, prompts: list[list[int]], max_new: int) -> float:
    ids = torch.tensor(prompts)
    t = time.perf_counter()
    hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new,
        min_new_tokens=max_new,
        do_sample=False,
        pad_token_id=0,
    )
    return time.perf_counter() - t


def _engine_generate(eng: LLMEngine, prompts: list[list[int]], lengths: list[int]) -> float:
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    eng.reset_prefix_cache()  # measure compute, not the cache
    t = time.perf_counter()
    outs = eng.generate(prompts, params)
    dt = time.perf_counter() - t
    assert [len(o.token_ids) for o in outs] == lengths
    return dt


def _ttft(eng: LLMEngine, prompt: list[int]) -> float:
    t = time.perf_counter()
    eng.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=2, help="best of N for each timing")
    ap.add_argument("--out", type=Path, default=Path("results/engine_bench.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    from engine.loader import resolve_model_path  # noqa: PLC0415

    path = resolve_model_path(args.model)
    eng = LLMEngine.from_pretrained(args.model)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    vocab = eng.model_config.vocab_size
    best = lambda f: min(f() for _ in range(args.repeats))  # noqa: E731

    # Warm-up both (first calls allocate and pick kernels).
    warm = _prompts(2, 32, vocab, 99)
    _engine_generate(eng, warm, [4, 4])
    _hf_generate(hf, warm, 4)

    results: dict[str, dict] = {}
    pa = _prompts(16, 128, vocab, 1)
    ours = best(lambda: _engine_generate(eng, pa, [64] * 16))
    theirs = best(lambda: _hf_generate(hf, pa, 64))
    results["a_uniform"] = {"tokens": 16 * 64, "kvferry_s": ours, "transformers_s": theirs,
                            "kvferry_tok_s": 16 * 64 / ours, "transformers_tok_s": 16 * 64 / theirs,
                            "speedup": theirs / ours, "target": 1.25}

    pb = _prompts(32, 128, vocab, 2)
    lengths = [round(8 + (256 - 8) * i / 31) for i in range(32)]
    random.Random(3).shuffle(lengths)
    useful = sum(lengths)
    ours = best(lambda: _engine_generate(eng, pb, lengths))
    theirs = best(lambda: _hf_generate(hf, pb, max(lengths)))
    results["b_spread"] = {"tokens": useful, "kvferry_s": ours, "transformers_s": theirs,
                           "kvferry_tok_s": useful / ours, "transformers_tok_s": useful / theirs,
                           "speedup": theirs / ours, "target": 2.0}

    (pc,) = _prompts(1, 1024, vocab, 4)
    colds = []
    for _ in range(args.repeats):
        eng.reset_prefix_cache()
        colds.append(_ttft(eng, pc))
    cold = min(colds)
    cached = best(lambda: _ttft(eng, pc))
    hf_ttft = best(lambda: _hf_generate(hf, [pc], 1))
    results["c_ttft_1024"] = {"cold_s": cold, "cached_s": cached, "transformers_s": hf_ttft,
                              "speedup": cold / cached, "target": 5.0}

    meta = {
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "model": eng.model_id,
    }
    print(f"kvferry engine vs transformers generate ({meta['model']}, fp32, {meta['machine']})")
    print(f"{'workload':<16}{'kvferry':>14}{'transformers':>16}{'ratio':>9}{'target':>9}")
    for name in ("a_uniform", "b_spread"):
        r = results[name]
        print(f"{name:<16}{r['kvferry_tok_s']:>10.1f} t/s{r['transformers_tok_s']:>12.1f} t/s"
              f"{r['speedup']:>8.2f}x{r['target']:>8.2f}x")
    r = results["c_ttft_1024"]
    print(f"{'c_ttft cold':<16}{r['cold_s'] * 1e3:>11.0f} ms{r['transformers_s'] * 1e3:>13.0f} ms")
    print(f"{'c_ttft cached':<16}{r['cached_s'] * 1e3:>11.0f} ms{'':>16}{r['speedup']:>8.2f}x{r['target']:>8.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
