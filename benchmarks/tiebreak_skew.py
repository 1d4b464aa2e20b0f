"""Tie-break skew: ties seeded by a shared first block pile work onto one replica.

``.venv/bin/python benchmarks/tiebreak_skew.py TRACE [--out FILE]``

Every conversation of a real multi-turn chat trace starts with the same system-prompt
block. kvferry's policy used to seed its tie-break with the prompt's *first* block hash,
so every tie between equal-cost replicas went the same way. This replays a Mooncake
trace (``kvferry replay``'s simulator, default pool: 8 replicas x 1M device tokens) with
one shared block prepended to every request, three ways, in the same run:

* ``kvferry``: the policy as it is (ties seeded per request: the prompt's last block);
* ``kvferry_first_block_ties`` (the peer): the same policy with ties seeded by the first
  block, as before;
* ``kvferry_no_shared_block``: the original trace, for scale.

Prints imbalance (busiest replica's prefill work / mean), hit rate and mean TTFT, and the
ratios new / old; writes JSON to ``--out`` (default ``results/tiebreak_skew.json``). The
simulation is deterministic: the figures do not depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `router` importable without an install
    sys.path.insert(0, str(REPO))

from router.policy import RequestInfo  # noqa: E402
from router.replay import PoolSimulator, ReplayConfig, TraceRequest, load_trace  # noqa: E402

SYSTEM_BLOCK = -1  # a block id no Mooncake trace uses


class FirstBlockTies(PoolSimulator):
    """kvferry with the old tie-break seed: the prompt's first block hash."""

    def request_info(self, req: TraceRequest) -> RequestInfo:
        info = super().request_info(req)
        return RequestInfo(info.block_hashes, info.num_tokens, info.block_size, tiebreak_seed=req.hash_ids[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", type=Path)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "tiebreak_skew.json")
    args = ap.parse_args()
    trace = load_trace(args.trace)
    shared = [TraceRequest(r.arrival_s, r.input_length + 512, r.output_length, (SYSTEM_BLOCK,) + r.hash_ids)
              for r in trace]
    cfg = ReplayConfig()
    runs = {
        "kvferry": PoolSimulator("kvferry", cfg).run(shared),
        "kvferry_first_block_ties": FirstBlockTies("kvferry", cfg).run(shared),
        "kvferry_no_shared_block": PoolSimulator("kvferry", cfg).run(trace),
    }
    out = {k: {"imbalance": r.imbalance, "hit_rate": r.hit_rate, "ttft_mean_s": r.ttft_mean_s,
               "ttft_p99_s": r.ttft_p99_s} for k, r in runs.items()}
    new, old = out["kvferry"], out["kvferry_first_block_ties"]
    out["ratios_new_vs_first_block_ties"] = {k: new[k] / old[k] for k in ("imbalance", "ttft_mean_s")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    for k, r in runs.items():
        print(f"{k:<26} imbalance {r.imbalance:.3f}  hit rate {r.hit_rate:.1%}  TTFT mean {r.ttft_mean_s:.3f} s  "
              f"p99 {r.ttft_p99_s:.3f} s")
    ratio = out["ratios_new_vs_first_block_ties"]
    print(f"per-request ties vs first-block ties: imbalance {ratio['imbalance']:.2f}x, "
          f"mean TTFT {ratio['ttft_mean_s']:.2f}x; wrote {args.out}")


if __name__ == "__main__":
    main()
