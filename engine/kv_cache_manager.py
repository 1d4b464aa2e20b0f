"""Per-request KV block bookkeeping on top of the block pool.

Finds a request's cached prefix (on the device, or in the host and disk tiers behind it),
reserves blocks for the tokens a step will compute, publishes newly full blocks to the
prompt cache, and frees a request's blocks.
"""

from __future__ import annotations

import enum

from engine.block_hash import hash_block, root_hash
from engine.block_pool import BlockPool, KVBlock
from engine.kv_events import Tier
from engine.kv_tiers.tiered_kv import LowerHit, TieredKV
from engine.outputs import TokensByTier
from engine.request import Request

# A request's cached prefix, block by block: on the device already, or in a lower tier.
PrefixHit = list[KVBlock | LowerHit]


class PrefixState(enum.Enum):
    """Whether a request's cached prefix is usable yet (promotions may be in flight)."""

    READY = "ready"
    PENDING = "pending"
    FAILED = "failed"


class KVCacheManager:
    """Maps requests to blocks; the only writer of ``Request.blocks``."""

    def __init__(self, pool: BlockPool, block_size: int, model_id: str) -> None:
        self.pool = pool
        self.block_size = block_size
        self.model_id = model_id
        # The host and disk tiers, when the engine has them (``LLMEngine`` attaches them).
        self.tiers: TieredKV | None = None
        # Cumulative prefix-cache counters, in tokens (vLLM's prefix_cache_{queries,hits}).
        self.num_query_tokens = 0
        self.num_hit_tokens = 0
        self.hit_tokens_by_tier = TokensByTier()

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def update_block_hashes(self, req: Request) -> None:
        """Extend ``req.block_hashes`` to every full block of ``req.all_token_ids``."""
        bs = self.block_size
        hashes = req.block_hashes
        num_full = req.num_tokens // bs
        if len(hashes) >= num_full:
            return
        parent = hashes[-1] if hashes else root_hash(self.model_id, bs, req.params.cache_salt)
        tokens = req.all_token_ids
        for i in range(len(hashes), num_full):
            parent = hash_block(parent, tokens[i * bs : (i + 1) * bs])
            hashes.append(parent)

    def find_cached_prefix(self, req: Request, now: float, device_only: bool = False) -> PrefixHit:
        """Leading cached blocks of ``req``, each from the fastest tier holding it (never its
        last token: it needs logits). ``device_only`` stops at the first block not on the device."""
        self.update_block_hashes(req)
        bs = self.block_size
        max_blocks = (req.num_tokens - 1) // bs
        tokens = req.all_token_ids
        tiers = None if device_only else self.tiers
        hits: PrefixHit = []
        for i, block_hash in enumerate(req.block_hashes[:max_blocks]):
            block_tokens = tokens[i * bs : (i + 1) * bs]
            hit = self.pool.lookup(block_hash, block_tokens, now)
            if hit is None and tiers is not None:
                hit = tiers.find(block_hash, block_tokens, now)
            if hit is None:
                break
            hits.append(hit)
        return hits

    def split_by_tier(self, hits: PrefixHit) -> TokensByTier:
        """Tokens of ``hits`` per tier."""
        n = [0, 0, 0]
        for h in hits:
            n[Tier.DEVICE if isinstance(h, KVBlock) else h.tier] += self.block_size
        return TokensByTier(*n)

    def record_lookup(self, num_query_tokens: int, hit: TokensByTier) -> None:
        """Count one admitted request's prefix-cache lookup (retries are not counted)."""
        self.num_query_tokens += num_query_tokens
        self.num_hit_tokens += hit.total
        self.hit_tokens_by_tier += hit

    def can_allocate(self, req: Request, num_new_tokens: int, cached: PrefixHit) -> bool:
        total = req.num_computed_tokens + len(cached) * self.block_size + num_new_tokens
        on_device = [b for b in cached if isinstance(b, KVBlock)]
        # Lower-tier hits need fresh device blocks, like computed ones.
        new = self.blocks_needed(total) - len(req.blocks) - len(on_device)
        # Cached hits sitting on the free list stop being free once we take them.
        reused_free = sum(1 for b in on_device if b.ref_cnt == 0)
        return max(new, 0) + reused_free <= self.pool.num_free_blocks

    def allocate(self, req: Request, num_new_tokens: int, now: float, cached: PrefixHit | None = None) -> bool:
        """Reserve blocks so ``req`` can compute ``num_new_tokens`` more tokens.

        ``cached`` (first admission only) are the prefix hits, which become the head of the
        block table and count as computed; lower-tier hits start their promotion here (see
        :meth:`prefix_state`). Returns False, changing nothing, when the pool is short of blocks.
        """
        cached = cached or []
        if cached and req.blocks:
            raise RuntimeError(f"request {req.request_id} already has blocks")
        if not self.can_allocate(req, num_new_tokens, cached):
            return False
        if cached:
            req.blocks.extend(self._take_hits(req, cached, now))
            req.num_computed_tokens = len(cached) * self.block_size
            req.num_cached_blocks = len(cached)
        need = self.blocks_needed(req.num_computed_tokens + num_new_tokens) - len(req.blocks)
        if need > 0:
            new_blocks = self.pool.allocate(need, now)
            if new_blocks is None:
                raise RuntimeError("pool refused an allocation that can_allocate approved")
            req.blocks.extend(new_blocks)
        return True

    def _take_hits(self, req: Request, cached: PrefixHit, now: float) -> list[KVBlock]:
        """Reference the device hits and promote the lower-tier ones; blocks in prompt order."""
        ttls = [req.block_ttl_s(i, self.block_size) for i in range(len(cached))]
        device = [(i, b) for i, b in enumerate(cached) if isinstance(b, KVBlock)]
        # Device hits first: off the free list before a promotion's allocation could evict them.
        self.pool.touch([b for _, b in device], now, [ttls[i] for i, _ in device])
        blocks: list = list(cached)
        lower = [(i, h) for i, h in enumerate(cached) if isinstance(h, LowerHit)]
        if lower:
            if self.tiers is None:
                raise RuntimeError("a lower-tier hit without lower tiers")
            promoted = self.tiers.promote([h for _, h in lower], now)
            self.pool.touch(promoted, now, [ttls[i] for i, _ in lower])
            for (i, _), b in zip(lower, promoted):
                blocks[i] = b
        return blocks

    def prefix_state(self, req: Request) -> PrefixState:
        """READY when every cached-prefix block of ``req`` holds its KV; PENDING while a
        promotion is still copying; FAILED when one could not be read back (a miss)."""
        state = PrefixState.READY
        for i in range(req.num_cached_blocks):
            block = req.blocks[i]
            if block.block_hash != req.block_hashes[i]:
                return PrefixState.FAILED
            if block.pending:
                state = PrefixState.PENDING
        return state

    def cache_full_blocks(self, req: Request, now: float) -> None:
        """Publish the blocks whose tokens are all computed to the prompt cache."""
        num_full = min(req.num_computed_tokens // self.block_size, len(req.blocks))
        if num_full <= req.num_cached_blocks:
            return
        self.update_block_hashes(req)
        bs = self.block_size
        entries, ttls = [], []
        for i in range(req.num_cached_blocks, num_full):
            parent = req.block_hashes[i - 1] if i else None
            tokens = req.all_token_ids[i * bs : (i + 1) * bs]
            entries.append((req.blocks[i], req.block_hashes[i], parent, tokens))
            ttls.append(req.block_ttl_s(i, bs))
        self.pool.cache_blocks(entries, now, ttls)
        req.num_cached_blocks = num_full

    def free(self, req: Request, now: float) -> None:
        """Release all of ``req``'s blocks, tail first (the shared prefix is evicted last)."""
        self.pool.free(reversed(req.blocks), now)
        req.blocks = []
        req.num_cached_blocks = 0
