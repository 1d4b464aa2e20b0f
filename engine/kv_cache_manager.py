"""Per-request KV block bookkeeping on top of the block pool.

Finds a request's cached prefix, reserves blocks for the tokens a step will compute,
publishes newly full blocks to the prompt cache, and frees a request's blocks.
"""

from __future__ import annotations

from engine.block_hash import hash_block, root_hash
from engine.block_pool import BlockPool, KVBlock
from engine.request import Request


class KVCacheManager:
    """Maps requests to blocks; the only writer of ``Request.blocks``."""

    def __init__(self, pool: BlockPool, block_size: int, model_id: str) -> None:
        self.pool = pool
        self.block_size = block_size
        self.model_id = model_id
        # Cumulative prefix-cache counters, in tokens (vLLM's prefix_cache_{queries,hits}).
        self.num_query_tokens = 0
        self.num_hit_tokens = 0

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

    def find_cached_prefix(self, req: Request, now: float) -> list[KVBlock]:
        """Leading cached blocks of ``req`` (never its last token: it needs logits)."""
        self.update_block_hashes(req)
        bs = self.block_size
        max_blocks = (req.num_tokens - 1) // bs
        tokens = req.all_token_ids
        hits: list[KVBlock] = []
        for i, block_hash in enumerate(req.block_hashes[:max_blocks]):
            block = self.pool.lookup(block_hash, tokens[i * bs : (i + 1) * bs], now)
            if block is None:
                break
            hits.append(block)
        return hits

    def record_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted request's prefix-cache lookup (retries are not counted)."""
        self.num_query_tokens += num_query_tokens
        self.num_hit_tokens += num_hit_tokens

    def can_allocate(self, req: Request, num_new_tokens: int, cached: list[KVBlock]) -> bool:
        total = req.num_computed_tokens + len(cached) * self.block_size + num_new_tokens
        new = self.blocks_needed(total) - len(req.blocks) - len(cached)
        # Cached hits sitting on the free list stop being free once we take them.
        reused_free = sum(1 for b in cached if b.ref_cnt == 0)
        return max(new, 0) + reused_free <= self.pool.num_free_blocks

    def allocate(
        self, req: Request, num_new_tokens: int, now: float, cached: list[KVBlock] | None = None
    ) -> bool:
        """Reserve blocks so ``req`` can compute ``num_new_tokens`` more tokens.

        ``cached`` (first admission only) are the prefix hits, which become the head of the
        block table and count as computed. Returns False, changing nothing, when the pool
        is short of blocks.
        """
        cached = cached or []
        if cached and req.blocks:
            raise RuntimeError(f"request {req.request_id} already has blocks")
        if not self.can_allocate(req, num_new_tokens, cached):
            return False
        if cached:
            self.pool.touch(cached, now, [req.block_ttl_s(i, self.block_size) for i in range(len(cached))])
            req.blocks.extend(cached)
            req.num_computed_tokens = len(cached) * self.block_size
            req.num_cached_blocks = len(cached)
        need = self.blocks_needed(req.num_computed_tokens + num_new_tokens) - len(req.blocks)
        if need > 0:
            new_blocks = self.pool.allocate(need, now)
            if new_blocks is None:
                raise RuntimeError("pool refused an allocation that can_allocate approved")
            req.blocks.extend(new_blocks)
        return True

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
