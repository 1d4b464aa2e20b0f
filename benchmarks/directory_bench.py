"""Directory micro-benchmarks: ingest rate, lookup latency, bytes per resident entry.

``.venv/bin/python benchmarks/directory_bench.py [--json] [--out FILE]``

* ``ingest_events_per_s``: block events (one hash of a BlockStored / Touched / Removed)
  folded in per second through :meth:`KVDirectory.apply`, batches of 64-block stores
  (a 1k-token prompt with 16-token blocks) plus touches and removals.
* ``lookup_p50_us`` / ``lookup_p99_us``: one ``lookup`` of a 128-block prompt in a
  directory of 64 replicas and 1M resident blocks; the prompt's prefix is held by 1-4
  replicas to varying depths (a shared system prompt is held by several, a conversation
  by one).
* ``bytes_per_entry``: tracemalloc's growth while loading the 1M entries, divided by 1M
  (keys, packed records, expiry buckets: everything the directory keeps).

The peer every number is compared with is the naive layout people write first: a
``dict[hash, dict[replica_id, (tier, expires_at)]]`` measured in the same run
(``naive_*`` keys and ``*_vs_naive`` ratios).
"""

from __future__ import annotations

import gc
import json
import random
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `engine`, `router` importable without an install
    sys.path.insert(0, str(REPO))

from engine.kv_events import BlockRemoved, BlockStored, BlockTouched, KVEventBatch, Tier  # noqa: E402
from router.directory import KVDirectory  # noqa: E402

NUM_REPLICAS = 64
NUM_RESIDENT = 1_000_000
PROMPT_BLOCKS = 128
CHAIN = 64  # blocks per stored prompt


def _hash(rng: random.Random) -> int:
    return rng.getrandbits(128)


def _chains(rng: random.Random, num_blocks: int) -> list[list[int]]:
    return [[_hash(rng) for _ in range(CHAIN)] for _ in range(num_blocks // CHAIN)]


class NaiveDirectory:
    """The peer: nested dicts of per-entry tuples (what the packed table replaces)."""

    def __init__(self) -> None:
        self.table: dict[int, dict[str, tuple[int, float]]] = {}

    def store(self, rid: str, hashes: list[int], tier: int, exp: float) -> None:
        for h in hashes:
            self.table.setdefault(h, {})[rid] = (tier, exp)

    def lookup(self, hashes: list[int], now: float) -> dict[str, int]:
        alive: dict[str, int] | None = None
        done: dict[str, int] = {}
        for h in hashes:
            holders = self.table.get(h, {})
            cur = {r for r, (_, e) in holders.items() if e > now}
            if alive is None:
                alive = {r: 0 for r in cur}
            for r in list(alive):
                if r in cur:
                    alive[r] += 1
                else:
                    done[r] = alive.pop(r)
            if not alive:
                break
        done.update(alive or {})
        return done


def bench_ingest(rng: random.Random, num_events: int = 600_000) -> float:
    """Block events per second through ``apply`` (stores, then touches and removals)."""
    d = KVDirectory()
    chains = _chains(rng, num_events // 2)
    batches: list[KVEventBatch] = []
    seq: dict[str, int] = {}
    for i, ch in enumerate(chains):
        rid = f"replica-{i % NUM_REPLICAS}"
        s = seq[rid] = seq.get(rid, -1) + 1
        batches.append(KVEventBatch(rid, s, 0.0, [BlockStored(tuple(ch), None, Tier.DEVICE, 300.0 + i * 0.01)]))
    for i, ch in enumerate(chains):
        rid = f"replica-{i % NUM_REPLICAS}"
        s = seq[rid] = seq[rid] + 1
        ev = BlockTouched(tuple(ch), 600.0 + i * 0.01) if i % 2 else BlockRemoved(tuple(ch))
        batches.append(KVEventBatch(rid, s, 0.0, [ev]))
    n = sum(len(ev.hashes) for b in batches for ev in b.events)
    gc.collect()
    t0 = time.perf_counter()
    for b in batches:
        d.apply(b)
    return n / (time.perf_counter() - t0)


def _populate(d: KVDirectory | NaiveDirectory, chains: list[list[int]], shared: list[list[int]]) -> None:
    seq = [0] * NUM_REPLICAS
    for i, ch in enumerate(chains):
        r = i % NUM_REPLICAS
        if isinstance(d, KVDirectory):
            d.apply(KVEventBatch(f"replica-{r}", seq[r], 0.0, [BlockStored(tuple(ch), None, Tier.DEVICE, 1e6 + i)]))
            seq[r] += 1
        else:
            d.store(f"replica-{r}", ch, 0, 1e6 + i)
    # Shared prefixes: the first 128-block chain of each probe, held by 1-4 replicas to
    # different depths.
    for j, ch in enumerate(shared):
        for k in range(1 + j % 4):
            r = (j * 7 + k) % NUM_REPLICAS
            depth = PROMPT_BLOCKS - 32 * k
            if isinstance(d, KVDirectory):
                d.apply(KVEventBatch(f"replica-{r}", seq[r], 0.0, [BlockStored(tuple(ch[:depth]), None, Tier.DEVICE, 2e6)]))
                seq[r] += 1
            else:
                d.store(f"replica-{r}", ch[:depth], 0, 2e6)


def bench_memory_and_lookup(rng: random.Random, num_probes: int = 2000) -> dict[str, float]:
    """Bytes per entry (tracemalloc) and lookup latency at 1M resident entries."""
    shared = [[_hash(rng) for _ in range(PROMPT_BLOCKS)] for _ in range(64)]
    num_shared_entries = sum(PROMPT_BLOCKS - 32 * k for j in range(64) for k in range(1 + j % 4))
    chains = _chains(rng, NUM_RESIDENT - num_shared_entries)
    out: dict[str, float] = {}
    for name, cls in (("", KVDirectory), ("naive_", NaiveDirectory)):
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        d = cls()
        _populate(d, chains, shared)
        used = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        entries = len(d) if isinstance(d, KVDirectory) else sum(len(v) for v in d.table.values())
        # The hash ints themselves are shared with the caller's lists; count them too,
        # since in the actor they arrive deserialized and are owned by the directory.
        hash_bytes = 48 * (len(d._table) if isinstance(d, KVDirectory) else len(d.table))
        out[f"{name}bytes_per_entry"] = (used + hash_bytes) / entries
        lat = []
        for i in range(num_probes):
            probe = shared[i % len(shared)] if i % 4 else chains[i % len(chains)] + shared[0][:64]
            t0 = time.perf_counter_ns()
            d.lookup(probe, 0.0)
            lat.append((time.perf_counter_ns() - t0) / 1000)
        lat.sort()
        out[f"{name}lookup_p50_us"] = statistics.median(lat)
        out[f"{name}lookup_p99_us"] = lat[int(0.99 * len(lat)) - 1]
        out[f"{name}num_entries"] = entries
        del d
    return out


def main(as_json: bool = False, out_path: str | None = "results/router_bench.json") -> dict[str, float]:
    """Run every benchmark; print a table (or JSON) and write the JSON file."""
    rng = random.Random(0)
    res = {"ingest_events_per_s": bench_ingest(rng)}
    res.update(bench_memory_and_lookup(rng))
    res["bytes_per_entry_vs_naive"] = res["naive_bytes_per_entry"] / res["bytes_per_entry"]
    res["lookup_p50_vs_naive"] = res["naive_lookup_p50_us"] / res["lookup_p50_us"]
    if out_path:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(res, indent=2))
    if as_json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k:28s} {v:14,.2f}")
    return res


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--out", default="results/router_bench.json", help="where to write the JSON results")
    a = ap.parse_args()
    main(a.json, a.out)
