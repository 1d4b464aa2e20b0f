"""``router.key_affinity``: prompt_cache_key -> replica memory (bounded, expiring) and the
preference step after the policy (load permitting; forced for a pinned explicit cache)."""

from __future__ import annotations

from router.key_affinity import KeyAffinity, prefer
from router.policy import ReplicaLoad


def test_keys_expire_are_bounded_and_forget_dead_replicas() -> None:
    keys = KeyAffinity(max_keys=2, ttl_s=10)
    keys.record("a", "r1", 0)
    keys.record("b", "r2", 1)
    assert keys.get("a", 5) == "r1"
    keys.record("a", "r1", 5)  # a use slides it and makes it the most recent
    keys.record("c", "r1", 6)  # over the bound: "b", the oldest, goes
    assert keys.get("b", 6) is None and len(keys) == 2
    assert keys.get("a", 14) == "r1" and keys.get("a", 15) is None
    keys.drop_replica("r1")
    assert keys.get("c", 7) is None


def _load(rid: str, running: int, kv: float = 0.0) -> ReplicaLoad:
    return ReplicaLoad(rid, num_running=running, max_num_seqs=10, kv_usage=kv)


def test_the_key_replica_goes_first_only_while_load_permits() -> None:
    loads = [_load("r1", 1), _load("r2", 4), _load("r3", 9)]
    ranked = ["r1", "r2", "r3"]
    assert prefer(ranked, "r2", loads, slack=0.5) == ["r2", "r1", "r3"]
    assert prefer(ranked, "r3", loads, slack=0.5) == ranked  # 0.9 vs 0.1: overloaded
    assert prefer(ranked, "gone", loads, slack=0.5) == ranked
    assert prefer(["r1", "r2"], "r3", loads, slack=0.5) == ["r1", "r2"]  # left out as full: not forced in
    # A pinned cache's replica goes first however loaded (its pins raise its KV usage).
    assert prefer(ranked, "r3", [_load("r1", 0), _load("r2", 0), _load("r3", 0, kv=0.9)], 0.0, force=True)[0] == "r3"
