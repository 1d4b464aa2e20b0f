"""Promote cost of one KV block per tier, against recomputing it: the router's tier credits.

``.venv/bin/python benchmarks/promote_cost.py [--device cpu|cuda] [--rounds N] [--out FILE]``

The routing policy (``router.policy``) charges a prefix hit in host memory or on disk the
time it takes to bring those blocks back to the device, instead of treating every hit
alike. This script measures that time for one KV block of the default model's shape, as
the engine lays it out (``ModelRunner.kv_cache[:, :, block]``: layers x (K, V) x
block_size x kv_heads x head_dim, the engine's dtype), with plain torch copies and file
reads — no tier code, so it measures the hardware, not an implementation:

* ``host``: copy one block from a second pool in host memory (pinned when the device is
  CUDA) into a slot of the device KV cache, synchronised. Also per block within a
  32-block batch (a prefix is promoted a run at a time).
* ``disk_cold``: read one block file (the block's raw bytes, written and fsynced, then
  dropped from the page cache with ``posix_fadvise(DONTNEED)``) into a host buffer and
  copy it into the device cache. ``disk_warm``: the same with the file in the page cache.
* The peer, measured in the same run: **recompute**, the engine's own prefill of fresh
  512-token prompts (no prefix hit) with ``max_tokens=1``, per block of ``block_size``
  tokens. ``vs_recompute`` is promote time / recompute time: the fraction of a cached
  block's saving the promotion gives back (the policy's credit is 1 minus it).

One torch thread, as a serving replica runs (``torch_threads: 1``); rounds interleave the
peer with the promotes so a shared box's load weighs on both alike.

``RoutingConfig.host_promote_us_per_token`` defaults to the ``host_batched`` figure (a
single block copied again and again stays in the CPU's caches; a run of blocks reads cold
memory, as a real promotion does), ``disk_promote_us_per_token`` to ``disk_cold`` and
``prefill_tokens_per_s`` to the peer's speed (recorded in BENCHMARKS.md).
Writes JSON to ``--out`` (default ``results/promote_cost.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `engine` importable without an install
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from engine import LLMEngine, SamplingParams  # noqa: E402
from machine import cpu_info  # noqa: E402

BATCH = 32
PROMPT_TOKENS = 512


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_s(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class _Promotes:
    """The promote paths of one block: host pool -> device, block file -> device."""

    def __init__(self, cache: torch.Tensor, pin: bool, tmp: Path) -> None:
        self.cache, self.pin, self.dev = cache, pin, cache.device
        self.host = torch.randn((cache.shape[0], 2, BATCH, *cache.shape[3:])).to(cache.dtype)
        if pin:
            self.host = self.host.pin_memory()
        self.buf = torch.empty(cache[:, :, 0].shape, dtype=cache.dtype, pin_memory=pin)
        self.view = memoryview(self.buf.numpy()).cast("B")
        self.paths = []
        for i in range(BATCH):
            p = tmp / f"block-{i}.kv"
            with open(p, "wb") as f:
                f.write(self.host[:, :, i].contiguous().numpy().tobytes())
                f.flush()
                os.fsync(f.fileno())
            self.paths.append(p)
        self._rng = random.Random(0)

    def host_one(self) -> None:
        self.cache[:, :, 0].copy_(self.host[:, :, 0], non_blocking=self.pin)
        _sync(self.dev)

    def host_batch(self) -> None:
        self.cache[:, :, :BATCH].copy_(self.host, non_blocking=self.pin)
        _sync(self.dev)

    def disk(self, cold: bool) -> float:
        """Seconds to read one block file into the (pinned) buffer and copy it to the device."""
        fd = os.open(self.paths[self._rng.randrange(BATCH)], os.O_RDONLY)
        try:
            if cold:  # out of the page cache: the read goes to the disk
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            t0 = time.perf_counter()
            with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
                n = f.readinto(self.view)
            assert n == len(self.view), (n, len(self.view))
            self.cache[:, :, 1].copy_(self.buf, non_blocking=self.pin)
            _sync(self.dev)
            return time.perf_counter() - t0
        finally:
            os.close(fd)


def _prefill(eng: LLMEngine, rng: random.Random) -> None:
    """The peer: the engine prefilling a fresh PROMPT_TOKENS-token prompt (no prefix hit)."""
    prompt = [rng.randrange(eng.model_config.vocab_size) for _ in range(PROMPT_TOKENS)]
    eng.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))


def measure(device: str, rounds: int, per_round: int) -> dict:
    """All the figures of one run (see the module docstring).

    Rounds interleave one prefill with ``per_round`` promotes of each kind, so load from
    other processes on a shared box weighs on promote and recompute alike; medians.
    """
    eng = LLMEngine.from_pretrained("default", device=device, num_threads=1,
                                    num_kv_blocks=2 * BATCH + PROMPT_TOKENS // 16 + 8)
    cache = eng.runner.kv_cache  # (layers, 2, blocks, block_size, kv_heads, head_dim)
    rng = random.Random(1)
    t: dict[str, list[float]] = {k: [] for k in ("prefill", "host", "host_batched", "disk_cold", "disk_warm")}
    with tempfile.TemporaryDirectory(prefix="kvferry-promote-") as d:
        pr = _Promotes(cache, eng.device.type == "cuda", Path(d))
        _prefill(eng, rng)  # warm-up
        pr.host_one(), pr.host_batch(), pr.disk(True)
        for _ in range(rounds):
            t["prefill"].append(_time_s(lambda: _prefill(eng, rng)))
            for _ in range(per_round):
                t["host"].append(_time_s(pr.host_one))
                t["host_batched"].append(_time_s(pr.host_batch) / BATCH)
                t["disk_cold"].append(pr.disk(True))
                t["disk_warm"].append(pr.disk(False))
    med = {k: statistics.median(v) for k, v in t.items()}
    recompute_s = med["prefill"] / PROMPT_TOKENS * eng.block_size

    def row(per_block_s: float) -> dict:
        return {"per_block_us": per_block_s * 1e6, "promote_us_per_token": per_block_s / eng.block_size * 1e6,
                "vs_recompute": per_block_s / recompute_s}

    return {
        "device": str(eng.device), "cpu": cpu_info()["cpu_model"], "torch": torch.__version__, "torch_threads": 1,
        "model": eng.model_id, "dtype": str(cache.dtype).removeprefix("torch."), "block_size": eng.block_size,
        "block_shape": list(cache[:, :, 0].shape), "block_bytes": cache[:, :, 0].numel() * cache.element_size(),
        "rounds": rounds, "per_round": per_round,
        **{k: row(med[k]) for k in ("host", "host_batched", "disk_cold", "disk_warm")},
        "recompute": {"per_block_us": recompute_s * 1e6, "prefill_tokens_per_s": PROMPT_TOKENS / med["prefill"]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=8, help="prefills of the peer (one per round)")
    ap.add_argument("--per-round", type=int, default=25, help="promotes of each kind per round")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "promote_cost.json")
    args = ap.parse_args()
    res = measure(args.device, args.rounds, args.per_round)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"{res['model']} {res['dtype']}, block of {res['block_size']} tokens = {res['block_bytes']:,} bytes "
          f"{tuple(res['block_shape'])}, {res['device']} ({res['cpu']})")
    rec = res["recompute"]
    print(f"  recompute (peer)  {rec['per_block_us']:9.1f} us/block  ({rec['prefill_tokens_per_s']:,.0f} prefill tokens/s)")
    for k in ("host", "host_batched", "disk_cold", "disk_warm"):
        r = res[k]
        print(f"  {k:<16}  {r['per_block_us']:9.1f} us/block  {r['promote_us_per_token']:7.2f} us/token  "
              f"{r['vs_recompute']:.3f}x recompute")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
