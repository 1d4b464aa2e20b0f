"""Routing preferences beyond the prefix match: ``prompt_cache_key`` affinity and pinned caches.

OpenAI's ``prompt_cache_key`` says "these requests share a prefix": requests with one key
should reach the replica that already served the key, even before the directory knows
its blocks (or when their prompts differ after a short shared head). :class:`KeyAffinity`
remembers key -> replica, bounded (LRU) and expiring, with an explicit ``now``.
:func:`prefer` then moves a preferred replica to the front of the policy's ranking, *load
permitting*: only if the policy ranked it at all (it is not full) and, unless ``force``,
its load is within ``slack`` of the least loaded replica's. ``force`` is for explicit caches
(``RoutingHints.prefer_replica``): their pinned blocks live on one replica, and the blocks
the pin holds raise that replica's KV usage, so the load valve alone would push their
requests away from the only replica that has them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from router.policy import ReplicaLoad


class KeyAffinity:
    """Bounded, expiring map of routing key -> the replica its last request went to."""

    def __init__(self, max_keys: int = 10_000, ttl_s: float = 300.0) -> None:
        self.max_keys = max_keys
        self.ttl_s = ttl_s
        self._keys: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, key: str, now: float) -> str | None:
        entry = self._keys.get(key)
        if entry is None:
            return None
        if entry[1] <= now:
            del self._keys[key]
            return None
        return entry[0]

    def record(self, key: str, replica_id: str, now: float) -> None:
        """The key's request went to ``replica_id`` (sliding expiry; the oldest key goes when full)."""
        self._keys[key] = (replica_id, now + self.ttl_s)
        self._keys.move_to_end(key)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)

    def drop_replica(self, replica_id: str) -> None:
        for key in [k for k, (rid, _) in self._keys.items() if rid == replica_id]:
            del self._keys[key]


def load_of(ld: ReplicaLoad) -> float:
    """The decode policy's load measure: the larger of sequence slots and KV used."""
    frac = ld.num_running / ld.max_num_seqs if ld.max_num_seqs else 0.0
    return max(frac, ld.kv_usage)


def prefer(ranked: Sequence[str], replica_id: str | None, loads: Sequence[ReplicaLoad], slack: float,
           force: bool = False) -> list[str]:
    """``ranked`` with ``replica_id`` first when load permits (see the module doc)."""
    out = list(ranked)
    if replica_id is None or replica_id not in out or out[0] == replica_id:
        return out
    if not force:
        by_id = {ld.replica_id: load_of(ld) for ld in loads}
        least = min(by_id.get(r, 0.0) for r in out)
        if by_id.get(replica_id, 0.0) > least + slack:
            return out
    out.remove(replica_id)
    return [replica_id, *out]
