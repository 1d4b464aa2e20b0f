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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engine import LLMEngine, SamplingParams

# best-of-N timer: runs a timing callable N times, keeps the fastest.
Best = Callable[[Callable[[], float]], float]


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


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=2, help="best of N for each timing")
    ap.add_argument("--out", type=Path, default=Path("results/engine_bench.json"))
    return ap.parse_args()


def _load_both(model: str) -> tuple[LLMEngine, Any]:
    """Our engine and transformers' model on the same local weights (fp32, eval mode)."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    from engine.loader import resolve_model_path  # noqa: PLC0415

    path = resolve_model_path(model)
    eng = LLMEngine.from_pretrained(model)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    return eng, hf


def _throughput(tokens: int, ours: float, theirs: float, target: float) -> dict[str, float]:
    """One throughput row; both sides credited the same ``tokens`` (what the requests asked for)."""
    return {"tokens": tokens, "kvferry_s": ours, "transformers_s": theirs,
            "kvferry_tok_s": tokens / ours, "transformers_tok_s": tokens / theirs,
            "speedup": theirs / ours, "target": target}


def _workload_uniform(eng: LLMEngine, hf: Any, vocab: int, best: Best) -> dict[str, float]:
    """(a) 16 requests x (128 prompt tokens, 64 generated)."""
    pa = _prompts(16, 128, vocab, 1)
    ours = best(lambda: _engine_generate(eng, pa, [64] * 16))
    theirs = best(lambda: _hf_generate(hf, pa, 64))
    return _throughput(16 * 64, ours, theirs, 1.25)


def _workload_spread(eng: LLMEngine, hf: Any, vocab: int, best: Best) -> dict[str, float]:
    """(b) 32 requests, generated lengths spread 8..256; transformers runs all to the longest."""
    pb = _prompts(32, 128, vocab, 2)
    lengths = [round(8 + (256 - 8) * i / 31) for i in range(32)]
    random.Random(3).shuffle(lengths)
    ours = best(lambda: _engine_generate(eng, pb, lengths))
    theirs = best(lambda: _hf_generate(hf, pb, max(lengths)))
    return _throughput(sum(lengths), ours, theirs, 2.0)


def _workload_ttft(eng: LLMEngine, hf: Any, vocab: int, best: Best, repeats: int) -> dict[str, float]:
    """(c) time to first token of a 1,024-token prompt, cold vs fully cached."""
    (pc,) = _prompts(1, 1024, vocab, 4)
    colds = []
    for _ in range(repeats):
        eng.reset_prefix_cache()  # cold: every repetition starts from an empty cache
        colds.append(_ttft(eng, pc))
    cold = min(colds)
    cached = best(lambda: _ttft(eng, pc))
    hf_ttft = best(lambda: _hf_generate(hf, [pc], 1))
    return {"cold_s": cold, "cached_s": cached, "transformers_s": hf_ttft, "speedup": cold / cached, "target": 5.0}


def _meta(eng: LLMEngine) -> dict[str, str]:
    return {
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "model": eng.model_id,
    }


def _print_table(meta: dict[str, str], results: dict[str, dict]) -> None:
    print(f"kvferry engine vs transformers generate ({meta['model']}, fp32, {meta['machine']})")
    print(f"{'workload':<16}{'kvferry':>14}{'transformers':>16}{'ratio':>9}{'target':>9}")
    for name in ("a_uniform", "b_spread"):
        r = results[name]
        print(f"{name:<16}{r['kvferry_tok_s']:>10.1f} t/s{r['transformers_tok_s']:>12.1f} t/s"
              f"{r['speedup']:>8.2f}x{r['target']:>8.2f}x")
    r = results["c_ttft_1024"]
    print(f"{'c_ttft cold':<16}{r['cold_s'] * 1e3:>11.0f} ms{r['transformers_s'] * 1e3:>13.0f} ms")
    print(f"{'c_ttft cached':<16}{r['cached_s'] * 1e3:>11.0f} ms{'':>16}{r['speedup']:>8.2f}x{r['target']:>8.2f}x")


def main() -> None:
    args = _parse_args()
    torch.set_num_threads(args.threads)
    eng, hf = _load_both(args.model)
    vocab = eng.model_config.vocab_size
    best: Best = lambda f: min(f() for _ in range(args.repeats))  # noqa: E731

    # Warm-up both (first calls allocate and pick kernels).
    warm = _prompts(2, 32, vocab, 99)
    _engine_generate(eng, warm, [4, 4])
    _hf_generate(hf, warm, 4)

    results: dict[str, dict] = {
        "a_uniform": _workload_uniform(eng, hf, vocab, best),
        "b_spread": _workload_spread(eng, hf, vocab, best),
        "c_ttft_1024": _workload_ttft(eng, hf, vocab, best, args.repeats),
    }
    meta = _meta(eng)
    _print_table(meta, results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
