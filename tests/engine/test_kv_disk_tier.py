"""The disk tier's files: corrupt or half-written files are misses and are removed, a
fingerprint keys every file, and engines sharing a directory share one byte budget."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from engine.kv_tiers.block_file import block_path
from engine.kv_tiers.disk_tier import DiskTier
from engine.kv_tiers.fingerprint import kv_fingerprint, weights_digest
from engine.kv_tiers.lifetimes import TierLifetimes
from engine.kv_tiers.tier_index import TierEntry

SHAPE = (2, 2, 4, 2, 8)  # (L, 2, bs, H_kv, D)
FP = "a" * 32
LIFE = TierLifetimes(False, True, disk_ttl_s=86400.0)


def _tier(root: Path, cap: int = 1 << 20, fp: str = FP) -> DiskTier:
    return DiskTier(root, cap, fp, SHAPE, torch.float32)


def _put(tier: DiskTier, h: int, now: float = 0.0) -> torch.Tensor:
    payload = torch.full(SHAPE, float(h))
    tier.put(TierEntry(h, None, (h, h), 3600.0, now, now + 3600.0), payload, now)
    return payload


def _read(tier: DiskTier, h: int) -> torch.Tensor | None:
    """Promote block ``h`` from the file (not from a write still in memory)."""
    assert tier.flush()
    tier.poll()
    op = tier.take(tier.index.entries[h])
    assert op.finished.wait(10)
    return op.payload


def test_a_block_round_trips_and_its_file_goes_with_the_promotion(tmp_path: Path) -> None:
    tier = _tier(tmp_path)
    payload = _put(tier, 7)
    assert tier.flush() and block_path(tier.dir, 7).exists()
    assert torch.equal(_read(tier, 7), payload)
    assert tier.flush() and not block_path(tier.dir, 7).exists()  # one tier at a time
    # Promoted before its write landed: the bytes come from memory and no file stays behind.
    p8 = _put(tier, 8)
    op = tier.take(tier.index.entries[8])
    assert op.done() and torch.equal(op.payload, p8)
    assert tier.flush() and not block_path(tier.dir, 8).exists()
    tier.close()


def test_corrupt_and_half_written_files_are_misses_and_are_removed(tmp_path: Path) -> None:
    tier = _tier(tmp_path)
    for h in (1, 2, 3):
        _put(tier, h)
    assert tier.flush()
    # Flip one payload byte of block 1: the checksum refuses it at read time.
    p1 = block_path(tier.dir, 1)
    raw = bytearray(p1.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    p1.write_bytes(bytes(raw))
    assert _read(tier, 1) is None
    assert not p1.exists()
    # Cut block 2's file in half (a crash mid-write without the rename's protection).
    p2 = block_path(tier.dir, 2)
    p2.write_bytes(p2.read_bytes()[: p2.stat().st_size // 2])
    assert _read(tier, 2) is None and not p2.exists()
    tier.close()
    # A restarted tier never adopts a partial file, nor junk named like a block.
    p3 = block_path(tier.dir, 3)
    p3.write_bytes(p3.read_bytes()[:-5])
    junk = block_path(tier.dir, 4)
    junk.write_bytes(b"not a block")
    again = _tier(tmp_path)
    assert again.load(now=0.0, lifetimes=LIFE) == []
    assert not p3.exists() and not junk.exists()
    again.close()


def test_a_restarted_tier_adopts_files_by_age_and_drops_expired_ones(tmp_path: Path) -> None:
    tier = _tier(tmp_path)
    _put(tier, 10)
    # Block 11 was last used 25 hours ago: past the disk TTL of 24 h by the time anyone looks.
    tier.put(TierEntry(11, None, (11, 11), 86400.0 * 2, -25 * 3600.0, 1.0), torch.zeros(SHAPE), now=0.0)
    tier.close()
    fresh = _tier(tmp_path)
    adopted = fresh.load(now=500.0, lifetimes=LIFE)
    assert [e.block_hash for e in adopted] == [10]
    assert not block_path(fresh.dir, 11).exists()
    # Aged by the wall clock: written at engine time 0 with a 1 h lifetime.
    assert 500.0 + 3590.0 < fresh.index.entries[10].expires_at <= 500.0 + 3600.0
    fresh.close()


def test_the_fingerprint_keys_model_dtype_block_size_layout_and_weights(tmp_path: Path) -> None:
    base = ("m", torch.float32, 16, (30, 2, 16, 3, 64), "w")
    fp = kv_fingerprint(*base)
    assert kv_fingerprint(*base) == fp
    for changed in [("other", *base[1:]), (base[0], torch.bfloat16, *base[2:]), (*base[:2], 32, *base[3:]),
                    (*base[:3], (30, 2, 16, 2, 64), base[4]), (*base[:4], "w2")]:
        assert kv_fingerprint(*changed) != fp
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    assert weights_digest(a) != weights_digest(b) and weights_digest(a) == weights_digest(a)
    # Another fingerprint's tier never sees this one's files.
    mine = _tier(tmp_path)
    _put(mine, 5)
    mine.close()
    other = _tier(tmp_path, fp="b" * 32)
    assert other.load(now=0.0, lifetimes=LIFE) == []
    assert block_path(mine.dir, 5).exists()  # and leaves them alone
    other.close()


def test_two_engines_on_one_directory_share_the_byte_budget(tmp_path: Path) -> None:
    probe = _tier(tmp_path / "probe")
    _put(probe, 1000)
    probe.close()
    file_bytes = block_path(probe.dir, 1000).stat().st_size
    cap = 10 * file_bytes
    a, b = _tier(tmp_path / "shared", cap), _tier(tmp_path / "shared", cap)
    for h in range(40):  # 40 files into a budget of 10, from two writers at once
        _put(a if h % 2 else b, 1000 + h, now=float(h))
    assert a.flush() and b.flush()
    files = list((tmp_path / "shared").rglob("*.kvb"))
    assert sum(f.stat().st_size for f in files) <= cap
    assert len(files) >= 8  # full, give or take a file (sizes differ by a few header bytes)
    on_disk = {int(f.stem, 16) for f in files}
    a.poll()
    b.poll()  # each learns what its own evictions deleted
    assert on_disk <= set(a.index.entries) | set(b.index.entries)
    # A file the other engine deleted is a miss when read, never stale KV.
    for tier in (a, b):
        for h in sorted(set(tier.index.entries) - on_disk):
            assert _read(tier, h) is None
        for h in sorted(set(tier.index.entries) & on_disk):
            assert torch.equal(_read(tier, h), torch.full(SHAPE, float(h)))
    a.close()
    b.close()
