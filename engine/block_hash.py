"""Chained, deterministic prompt-block hashes shared by the engine and the router.

The contract: only *full* blocks are hashed; ``h_i = H(h_{i-1}, tokens of block i)``
where ``h_{-1}`` folds in the model id, the block size and the tenant's cache salt. ``H``
is xxh3-128, which has no per-process seed, so every process on every machine computes
the same keys; the router (on the ingress) and the engine (on a replica) therefore agree
on which blocks a prompt maps to.

Hashes are Python ints (128 bits): compact as dict keys and cheap to compare. A hit is
still confirmed by comparing the stored tokens (see ``engine.block_pool``), so a collision
can never return the wrong KV.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xxhash

BlockHash = int

_SEED_TAG = b"kvferry-block-hash-v1"


def root_hash(model_id: str, block_size: int, salt: str | None = None) -> BlockHash:
    """Return ``h_{-1}``: the chain's root for one model, block size and tenant salt."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    payload = b"\x00".join(
        [_SEED_TAG, model_id.encode(), str(block_size).encode(), (salt or "").encode()]
    )
    return xxhash.xxh3_128_intdigest(payload)


def hash_block(parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    """Hash one full block given its parent's hash (``h_i`` from ``h_{i-1}``)."""
    tokens = np.asarray(token_ids, dtype=np.int64).tobytes()
    return xxhash.xxh3_128_intdigest(parent.to_bytes(16, "little") + tokens)


def hash_prompt_blocks(
    token_ids: Sequence[int],
    block_size: int,
    model_id: str,
    salt: str | None = None,
) -> list[BlockHash]:
    """Hashes of every full block of ``token_ids`` (a trailing partial block is ignored)."""
    parent = root_hash(model_id, block_size, salt)
    num_full = len(token_ids) // block_size
    out: list[BlockHash] = []
    for i in range(num_full):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size])
        out.append(parent)
    return out
