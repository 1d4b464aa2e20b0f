"""KV tiers: cached TTFT from each tier vs cold, and multi-turn chat bigger than the device pool.

Default model (SmolLM2-135M-Instruct, fp32), engine offline, one process, one run:

(a) Time to first token of a 2,048-token prompt: cold (recomputed) vs its KV cached on the
    device, in host memory, on disk with the files in the page cache, and on disk after
    ``posix_fadvise(DONTNEED)`` dropped them from the page cache. The tiers are reached by
    moving the engine clock past the device TTL (600 s) and the host TTL (1200 s) of a
    1-hour block. Best of --repeats. Targets: host <= 0.25x cold, disk <= 0.5x cold.
(b) Multi-turn chat: --conversations conversations share a system prompt; each turn
    sends the whole history plus a new user message and generates 16 tokens; turns of
    different conversations interleave at random. The working set (all histories) is
    about --working-set times the device KV pool. Hit rate and mean / p90 TTFT with the
    device tier only, device + host (2x the device pool), device + host + disk.
    Target: mean TTFT with all tiers <= 0.6x device only.

Prints tables with the ratios and writes JSON to --out (default results/kv_tiers_bench.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

import torch  # noqa: E402

from engine import LLMEngine, SamplingParams  # noqa: E402
from machine import cpu_info  # noqa: E402

BS = 16
HOUR = 3600.0
# Long enough that no block ages on its own during a slow (shared-box) prefill; the
# benchmark moves the clock past them instead.
TIER_TTLS = dict(device_ttl_s=600.0, host_ttl_s=1200.0)


class ShiftedClock:
    """``time.monotonic`` plus an offset the benchmark moves to age the cache instantly."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


def _ttft(eng: LLMEngine, prompt: list[int], params: SamplingParams) -> tuple[float, Any]:
    """Seconds from add_request to the first token, and the request's final output."""
    rid = f"t{time.monotonic_ns()}"
    t0 = time.perf_counter()
    eng.add_request(rid, prompt, params)
    first, final = None, None
    while final is None:
        for out in eng.step():
            if out.request_id == rid and out.token_ids and first is None:
                first = time.perf_counter() - t0
            if out.request_id == rid and out.finished:
                final = out
    return first, final


def _settle(eng: LLMEngine) -> None:
    eng.step()
    if eng.tiers is not None and eng.tiers.disk is not None:
        eng.tiers.disk.flush()
    eng.step()


def _drop_page_cache(directory: Path) -> None:
    for f in directory.rglob("*.kvb"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_ttft(model: str, prompt_len: int, repeats: int, disk_dir: Path) -> dict[str, Any]:
    """(a): one engine with all tiers; each repetition walks the prompt down the tiers."""
    clock = ShiftedClock()
    eng = LLMEngine.from_pretrained(model, clock=clock, host_kv_bytes=256 << 20, disk_kv_dir=str(disk_dir),
                                    disk_kv_bytes=4 << 30, **TIER_TTLS)
    rng = random.Random(4)
    prompt = [rng.randrange(100, eng.model_config.vocab_size - 100) for _ in range(prompt_len)]
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, cache_ttl_s=HOUR)
    _ttft(eng, prompt[:64], params)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in ("cold", "device", "host", "disk", "disk_uncached")}
    want = (prompt_len - 1) // BS * BS
    for rep in range(repeats):
        print(f"  (a) repetition {rep + 1}/{repeats}", file=sys.stderr, flush=True)
        eng.reset_prefix_cache()
        t, cold = _ttft(eng, prompt, params)
        times["cold"].append(t)
        for tier, age in (("device", 0.0), ("host", 601.0), ("disk", 1201.0), ("disk_uncached", 1201.0)):
            clock.offset += age
            _settle(eng)
            if tier == "disk_uncached":
                _drop_page_cache(eng.tiers.disk.dir)
            t, out = _ttft(eng, prompt, params)
            split = getattr(out.cached_tokens_by_tier, tier.split("_")[0])
            assert split == want and out.token_ids == cold.token_ids, (tier, out.cached_tokens_by_tier)
            times[tier].append(t)
    eng.close()
    best = {k: min(v) for k, v in times.items()}
    return {
        "prompt_tokens": prompt_len,
        "block_bytes": eng.tiers.copier.block_nbytes,
        "ttft_s": best,
        "vs_cold": {k: best[k] / best["cold"] for k in best if k != "cold"},
        "targets": {"host": 0.25, "disk": 0.5},
    }


def _conversations(n: int, turns: int, vocab: int, seed: int) -> tuple[list[int], list[list[list[int]]]]:
    """A shared system prompt, and per conversation the user messages of each turn."""
    rng = random.Random(seed)
    tok = lambda k: [rng.randrange(100, vocab - 100) for _ in range(k)]  # noqa: E731
    system = tok(128)
    convs = [[tok(rng.randrange(100, 200))] + [tok(rng.randrange(30, 80)) for _ in range(turns - 1)]
             for _ in range(n)]
    return system, convs


def bench_multiturn(model: str, args: argparse.Namespace, tiers: dict[str, Any], disk_dir: Path | None) -> dict:
    """(b) for one tier setting: every turn in the same interleaved order."""
    eng = LLMEngine.from_pretrained(model, num_kv_blocks=args.device_blocks, max_num_seqs=4, **tiers,
                                    **({"disk_kv_dir": str(disk_dir), "disk_kv_bytes": 4 << 30} if disk_dir else {}))
    system, convs = _conversations(args.conversations, args.turns, eng.model_config.vocab_size, 7)
    order = [c for c in range(len(convs)) for _ in range(args.turns)]
    random.Random(8).shuffle(order)
    history = [list(system) for _ in convs]
    next_turn = [0] * len(convs)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    _ttft(eng, system[:32], params)  # warm-up
    ttfts, prompt_tokens, by_tier = [], 0, [0, 0, 0]
    for i, c in enumerate(order):
        if i % 10 == 0:
            name = "device" + (" + host" if tiers else "") + (" + disk" if disk_dir else "")
            print(f"  (b) {name}: turn {i}/{len(order)}", file=sys.stderr, flush=True)
        history[c] += convs[c][next_turn[c]]
        next_turn[c] += 1
        t, out = _ttft(eng, history[c], params)
        history[c] += out.token_ids
        ttfts.append(t)
        prompt_tokens += out.num_prompt_tokens
        s = out.cached_tokens_by_tier
        by_tier = [by_tier[0] + s.device, by_tier[1] + s.host, by_tier[2] + s.disk]
    eng.close()
    working_set = sum(len(h) for h in history)
    return {
        "turns": len(order),
        "working_set_tokens": working_set,
        "working_set_vs_device_pool": working_set / (args.device_blocks * BS),
        "hit_rate": sum(by_tier) / prompt_tokens,
        "hit_rate_by_tier": {"device": by_tier[0] / prompt_tokens, "host": by_tier[1] / prompt_tokens,
                             "disk": by_tier[2] / prompt_tokens},
        "ttft_mean_s": statistics.fmean(ttfts),
        "ttft_p90_s": statistics.quantiles(ttfts, n=10)[-1],
    }


def _meta() -> dict[str, str]:
    return {
        "cpu": cpu_info()["cpu_model"],
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
        # The box may be shared: the 1-minute load average when the run ended.
        "loadavg_1m": f"{os.getloadavg()[0]:.1f}",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=Path(__file__).resolve().parent).stdout.strip(),
    }


def _print(meta: dict[str, str], a: dict, b: dict[str, dict]) -> None:
    print(f"KV tiers ({meta['cpu']}, {meta['machine']}, load {meta['loadavg_1m']}, commit {meta['commit']})")
    print(f"(a) TTFT of a {a['prompt_tokens']}-token prompt, best of the repeats")
    for k, v in a["ttft_s"].items():
        ratio = "" if k == "cold" else f"{a['vs_cold'][k]:8.3f}x cold"
        print(f"  {k:<14}{v * 1e3:9.1f} ms  {ratio}")
    print("(b) multi-turn chat")
    base = b["device"]["ttft_mean_s"]
    for name, r in b.items():
        print(f"  {name:<18} hit {r['hit_rate']:6.1%}  mean {r['ttft_mean_s'] * 1e3:7.1f} ms"
              f"  p90 {r['ttft_p90_s'] * 1e3:7.1f} ms  {r['ttft_mean_s'] / base:6.3f}x device-only mean")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=3, help="best of N for (a)")
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--device-blocks", type=int, default=48, help="device KV pool of (b), blocks of 16 tokens")
    ap.add_argument("--out", type=Path, default=Path("results/kv_tiers_bench.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="kvferry-tiers-") as tmp:
        a = bench_ttft(args.model, args.prompt_tokens, args.repeats, Path(tmp) / "a")
        host_bytes = 2 * args.device_blocks * a["block_bytes"]
        b = {
            "device": bench_multiturn(args.model, args, {}, None),
            "device+host": bench_multiturn(args.model, args, {"host_kv_bytes": host_bytes}, None),
            "device+host+disk": bench_multiturn(args.model, args, {"host_kv_bytes": host_bytes}, Path(tmp) / "b"),
        }
    for r in b.values():
        r["ttft_mean_vs_device_only"] = r["ttft_mean_s"] / b["device"]["ttft_mean_s"]
    meta = _meta()
    _print(meta, a, b)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "ttft": a, "multiturn": b, "target_all_tiers": 0.6}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
