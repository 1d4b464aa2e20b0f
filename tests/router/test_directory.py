"""KVDirectory semantics with a fake clock: matches, expiry, sliding TTL, sweep order, gaps."""

from __future__ import annotations

import math

import pytest

from engine.block_hash import hash_prompt_blocks
from engine.kv_events import (
    AllCleared,
    BlockMoved,
    BlockRemoved,
    BlockStored,
    BlockTouched,
    CacheSnapshot,
    KVEventBatch,
    Tier,
)
from router.directory import KVDirectory, PrefixMatch

H = hash_prompt_blocks(list(range(16 * 6)), 16, "m")  # 6 chained block hashes


class Feeder:
    """Stamps consecutive seq_nos per replica, like an engine's take_events()."""

    def __init__(self, d: KVDirectory) -> None:
        self.d = d
        self.seq: dict[str, int] = {}

    def send(self, rid: str, *events, skip: int = 0):
        seq = self.seq.get(rid, -1) + 1 + skip
        self.seq[rid] = seq
        return self.d.apply(KVEventBatch(rid, seq, 0.0, list(events)))


def stored(hashes, expires_at, tier=Tier.DEVICE, parent=None):
    return BlockStored(tuple(hashes), parent, tier, expires_at)


def test_lookup_counts_leading_blocks_per_replica():
    d = KVDirectory()
    f = Feeder(d)
    f.send("a", stored(H[:4], 100.0))
    f.send("b", stored(H[:2], 100.0))
    f.send("c", stored(H[1:5], 100.0))  # no first block: holds no *prefix*
    m = d.lookup(H, now=0.0)
    assert m == {
        "a": PrefixMatch(4, Tier.DEVICE, (4, 0, 0)),
        "b": PrefixMatch(2, Tier.DEVICE, (2, 0, 0)),
    }
    assert d.lookup(H[3:], now=0.0).keys() == {"a", "c"}
    assert d.lookup([], now=0.0) == {}
    assert len(d) == 10


def test_chain_break_in_the_middle_stops_the_match():
    d = KVDirectory()
    f = Feeder(d)
    f.send("a", stored(H[:5], 100.0))
    f.send("a", BlockRemoved((H[2],)))
    assert d.lookup(H, now=0.0)["a"].num_blocks == 2


def test_tiers_are_reported_and_moved():
    d = KVDirectory()
    f = Feeder(d)
    f.send("a", stored(H[:2], 100.0), stored(H[2:4], 100.0, Tier.HOST))
    f.send("a", BlockMoved((H[3],), Tier.DISK))
    assert d.lookup(H, 0.0)["a"] == PrefixMatch(4, Tier.DISK, (2, 1, 1))


def test_a_move_carries_the_expiry_of_the_new_tier():
    d = KVDirectory()
    f = Feeder(d)
    f.send("a", stored(H[:4], 300.0))
    # Device TTL ran out at 300 s: the blocks are demoted to host memory for an hour.
    f.send("a", BlockMoved(tuple(H[:4]), Tier.HOST, expires_at=3900.0))
    assert d.lookup(H, 301.0)["a"] == PrefixMatch(4, Tier.HOST, (0, 4, 0))
    assert d.sweep(301.0) == 0  # the stale device-TTL slot is skipped, nothing expires
    assert len(d) == 4
    # A hit promotes two of them back with a fresh device expiry; None keeps the expiry.
    f.send("a", BlockMoved(tuple(H[:2]), Tier.DEVICE, expires_at=700.0), BlockMoved((H[3],), Tier.DISK))
    assert d.lookup(H, 400.0)["a"] == PrefixMatch(4, Tier.DISK, (2, 1, 1))
    assert d.stats().entries_by_tier == (2, 1, 1)
    assert d.sweep(700.0) == 2  # the promoted pair expires at its device TTL...
    assert d.lookup(H, 701.0) == {}  # ...which breaks the prefix at block 0
    assert d.stats().entries_by_tier == (0, 1, 1)
    assert d.sweep(3900.0) == 2 and len(d) == 0 and d.stats().entries_by_tier == (0, 0, 0)


def test_expired_entries_are_invisible_before_sweep():
    d = KVDirectory()
    f = Feeder(d)
    f.send("a", stored(H[:3], 10.0))
    assert d.lookup(H, 9.999)["a"].num_blocks == 3
    assert d.lookup(H, 10.0) == {}
    assert len(d) == 3  # not swept yet


def test_touch_slides_the_ttl():
    d = KVDirectory()
    f = Feeder(d)
    f.send("a", stored(H[:3], 10.0))
    f.send("a", BlockTouched(tuple(H[:2]), 20.0))
    assert d.lookup(H, 15.0)["a"].num_blocks == 2
    assert d.sweep(15.0) == 1  # H[2] expired; the touched ones moved to t=20
    assert len(d) == 2
    assert d.sweep(19.0) == 0
    assert d.sweep(20.0) == 2
    assert len(d) == 0 and d.stats().num_expired == 3


def test_sweep_expires_oldest_first_with_limit():
    d = KVDirectory()
    f = Feeder(d)
    f.send("a", stored([H[4]], 30.0), stored([H[0]], 10.0), stored([H[2]], 20.0))
    f.send("b", stored([H[1]], 15.0))
    assert d.sweep(100.0, limit=1) == 1
    assert d.lookup([H[0]], 0.0) == {}  # the oldest went first
    assert d.sweep(100.0, limit=2) == 2
    assert d.lookup([H[1]], 0.0) == {} and d.lookup([H[2]], 0.0) == {}
    assert d.lookup([H[4]], 0.0) == {"a": PrefixMatch(1, Tier.DEVICE, (1, 0, 0))}
    assert d.sweep(100.0) == 1 and len(d) == 0


def test_sweep_keeps_other_holders_of_the_same_block():
    d = KVDirectory()
    f = Feeder(d)
    f.send("a", stored(H[:2], 10.0))
    f.send("b", stored(H[:2], 50.0))
    assert d.sweep(20.0) == 2
    assert d.lookup(H, 20.0) == {"b": PrefixMatch(2, Tier.DEVICE, (2, 0, 0))}


def test_pinned_blocks_never_expire():
    d = KVDirectory()
    Feeder(d).send("a", stored(H[:1], math.inf))
    assert d.sweep(1e12) == 0
    assert d.lookup(H, 1e12)["a"].num_blocks == 1


def test_gap_marks_replica_for_snapshot_and_restore_clears_it():
    d = KVDirectory()
    f = Feeder(d)
    assert not f.send("a", stored(H[:2], 100.0)).snapshot_needed
    res = f.send("a", stored(H[2:3], 100.0), skip=1)  # seq 0 -> 2: batch 1 was lost
    assert res.snapshot_needed and d.needs_snapshot("a")
    assert d.lookup(H, 0.0)["a"].num_blocks == 3  # events after the gap still applied
    # The replica's truth: it also evicted H[1] in the lost batch.
    snap = CacheSnapshot("a", seq_no=2, timestamp=0.0, blocks=[
        (H[0], None, Tier.DEVICE, 100.0), (H[2], H[1], Tier.DEVICE, 100.0)])
    assert d.restore(snap) == 2
    assert not d.needs_snapshot("a")
    assert d.lookup(H, 0.0)["a"].num_blocks == 1
    assert len(d) == 2
    # Next batch continues from the snapshot's seq_no without a gap.
    assert not d.apply(KVEventBatch("a", 3, 0.0, [stored(H[1:2], 100.0)])).snapshot_needed
    assert d.lookup(H, 0.0)["a"].num_blocks == 3


def test_first_batch_after_directory_restart_asks_for_snapshot():
    d = KVDirectory()
    assert d.apply(KVEventBatch("a", 41, 0.0, [stored(H[:1], 9.0)])).snapshot_needed
    assert d.replicas_needing_snapshot() == ["a"]


def test_duplicate_batches_are_ignored():
    d = KVDirectory()
    b = KVEventBatch("a", 0, 0.0, [stored(H[:2], 10.0)])
    d.apply(b)
    d.apply(KVEventBatch("a", 1, 0.0, [BlockRemoved((H[0],))]))
    assert d.apply(b).num_events == 0
    assert d.lookup(H, 0.0) == {}


def test_drop_replica_and_all_cleared():
    d = KVDirectory()
    f = Feeder(d)
    f.send("a", stored(H[:3], 100.0))
    f.send("b", stored(H[:3], 100.0))
    f.send("c", stored(H[:1], 100.0))
    assert d.drop_replica("a") == 3
    assert d.lookup(H, 0.0).keys() == {"b", "c"}
    assert d.replica_ids() == ["b", "c"]
    f.send("b", AllCleared())
    assert d.lookup(H, 0.0).keys() == {"c"}
    assert len(d) == 1 and d.num_blocks("b") == 0
    assert d.sweep(200.0) == 1  # stale bucket slots of dropped/cleared entries are skipped
    # A new replica may reuse the freed slot without inheriting anything.
    f.send("d", stored(H[:2], 300.0))
    assert d.lookup(H, 250.0) == {"d": PrefixMatch(2, Tier.DEVICE, (2, 0, 0))}


def test_snapshot_round_trip():
    d = KVDirectory()
    f = Feeder(d)
    f.send("a", stored(H[:3], 100.0), stored(H[3:4], 50.0, Tier.HOST))
    f.send("b", stored(H[:1], math.inf))
    snaps = d.snapshot()
    e = KVDirectory()
    assert e.restore(snaps) == 5
    assert e.lookup(H, 0.0) == d.lookup(H, 0.0)
    assert e.lookup(H, 60.0)["a"].num_blocks == 3
    # seq_nos survive: the next batch of each replica is seq_no 1
    assert not e.apply(KVEventBatch("a", 1, 0.0, [])).snapshot_needed
    assert e.apply(KVEventBatch("b", 5, 0.0, [])).snapshot_needed


def test_bad_input_is_a_value_error():
    d = KVDirectory()
    with pytest.raises(ValueError):
        d.apply(KVEventBatch("a", -1, 0.0, []))
    with pytest.raises(ValueError):
        d.apply(KVEventBatch("a", 0, 0.0, [stored(H[:1], float("nan"))]))


def test_lookup_matches_a_brute_force_model_under_random_events():
    import random

    rng = random.Random(7)
    d = KVDirectory()
    f = Feeder(d)
    hashes = hash_prompt_blocks(list(range(16 * 12)), 16, "m")
    model: dict[tuple[str, int], tuple[Tier, float]] = {}
    for step in range(400):
        rid = rng.choice("abcd")
        lo = rng.randrange(len(hashes))
        hs = hashes[lo : lo + rng.randrange(1, 5)]
        kind = rng.random()
        if kind < 0.4:
            tier, exp = Tier(rng.randrange(3)), float(rng.randrange(5, 60))
            f.send(rid, stored(hs, exp, tier))
            model.update({(rid, h): (tier, exp) for h in hs})
        elif kind < 0.6:
            exp = float(rng.randrange(5, 60))
            f.send(rid, BlockTouched(tuple(hs), exp))
            model.update({(rid, h): (model[(rid, h)][0], exp) for h in hs if (rid, h) in model})
        elif kind < 0.7:
            tier = Tier(rng.randrange(3))
            exp = float(rng.randrange(5, 60)) if rng.random() < 0.5 else None
            f.send(rid, BlockMoved(tuple(hs), tier, exp))
            model.update({(rid, h): (tier, model[(rid, h)][1] if exp is None else exp)
                          for h in hs if (rid, h) in model})
        else:
            f.send(rid, BlockRemoved(tuple(hs)))
            for h in hs:
                model.pop((rid, h), None)
        now = float(rng.randrange(0, 40))
        want = {}
        for r in "abcd":
            per = [0, 0, 0]
            for h in hashes:
                e = model.get((r, h))
                if e is None or e[1] <= now:
                    break
                per[e[0]] += 1
            if sum(per):
                tier = Tier.DISK if per[2] else Tier.HOST if per[1] else Tier.DEVICE
                want[r] = PrefixMatch(sum(per), tier, tuple(per))
        assert d.lookup(hashes, now) == want, step
        by_tier = [0, 0, 0]
        for t, _ in model.values():
            by_tier[t] += 1
        assert d.stats().entries_by_tier == tuple(by_tier), step
    # Sweeping at the end agrees with the model's expiries, moves included.
    d.sweep(40.0)
    assert len(d) == sum(1 for _, e in model.values() if e > 40.0)
