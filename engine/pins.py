"""Pinned prompt prefixes: explicit caches (Gemini ``cachedContents``) that eviction never takes.

A pin holds one reference on each cached block of a prompt prefix, under a pin id, until
its expiry (fixed: a hit does not extend it) or an explicit :meth:`PinTable.unpin`. Held
blocks are never evicted nor demoted (``engine.block_pool``), so that is all "pinned"
needs; nothing here touches the pool's internals, only its public ``touch``/``free``.

While pinned, a block must also stay *findable*: a prefix lookup skips blocks whose
``expires_at`` has passed, held or not. So the table keeps each pinned block's ordinary
sliding TTL alive by re-touching it at half its remaining life (a touch plus a free: the
reference count is unchanged, the expiry slides, and a ``BlockTouched`` event tells the
KV directory). When the pin ends, its references are dropped and the blocks are ordinary
prompt cache again, with their own TTL (not the pin's), evicted LRU under pressure.

An engine-wide cap (``EngineConfig.max_pinned_fraction`` of the pool) bounds pinned
blocks, so pins can never starve running requests of KV memory. Every method takes an
explicit ``now`` (tests drive a fake clock).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from typing import TYPE_CHECKING

from engine.block_pool import BlockPool, KVBlock

if TYPE_CHECKING:
    from engine.kv_cache_manager import KVCacheManager
    from engine.request import Request


class PinRefused(ValueError):
    """Pinning would exceed the engine's cap on pinned blocks (or nothing is cached to pin)."""


@dataclass
class Pin:
    """One pinned prefix."""

    pin_id: str
    # The prefix's cached blocks, in prompt order; the pin holds one reference on each.
    blocks: list[KVBlock]
    # Prompt tokens the blocks cover (full blocks only).
    num_tokens: int
    # Absolute time (the engine clock) at which the pin ends.
    expires_at: float
    # When the blocks' lookup expiry is next slid forward.
    refresh_at: float


class PinTable:
    """Pins of one engine: pin, unpin, change expiry, expire and keep-alive on the engine clock."""

    def __init__(self, pool: BlockPool, max_blocks: int) -> None:
        self.pool = pool
        self.max_blocks = max_blocks
        self._pins: dict[str, Pin] = {}
        # request_id -> (pin_id, expires_at, num_tokens): pin that prompt when it finishes.
        self._asks: dict[str, tuple[str, float, int]] = {}
        # pin_id -> (tokens pinned, why not), kept until read by :meth:`result`.
        self._results: dict[str, tuple[int, str | None]] = {}
        # Cumulative pins ended at their expiry (metrics).
        self.num_expired = 0

    # ----------------------------------------------------------------- queries
    @property
    def num_pins(self) -> int:
        return len(self._pins)

    @property
    def num_pinned_blocks(self) -> int:
        """Pinned blocks, counted once per pin (two pins of one prefix count twice: both hold it)."""
        return sum(len(p.blocks) for p in self._pins.values())

    @property
    def num_pinned_tokens(self) -> int:
        return sum(p.num_tokens for p in self._pins.values())

    def get(self, pin_id: str) -> Pin | None:
        return self._pins.get(pin_id)

    def ids(self) -> list[str]:
        return list(self._pins)

    # ------------------------------------------------------ pin a finishing request
    def ask(self, request_id: str, pin_id: str, expires_at: float, num_tokens: int) -> None:
        """Pin the first ``num_tokens`` prompt tokens of ``request_id`` when it finishes."""
        self._asks[request_id] = (pin_id, expires_at, num_tokens)

    def forget(self, request_id: str) -> None:
        """The request was aborted or failed: nothing to pin."""
        self._asks.pop(request_id, None)

    def result(self, pin_id: str) -> tuple[int, str | None]:
        """(tokens pinned, why not) of the last attempt under ``pin_id`` (read once)."""
        return self._results.pop(pin_id, (0, "the request did not finish normally"))

    def on_finish(self, req: Request, kv: KVCacheManager, now: float) -> None:
        """Called while ``req`` still holds its blocks: pin its prefix if it was asked to.

        The blocks are found by hash (a block computed twice at once is cached only once,
        maybe not in this request's table). The same pin already held here with the same
        expiry is kept as is (a request that uses an explicit cache re-asks for its pin).
        """
        ask = self._asks.pop(req.request_id, None)
        if ask is None:
            return
        pin_id, expires_at, num_tokens = ask
        held = self._pins.get(pin_id)
        if held is not None and held.expires_at == expires_at:
            self._results[pin_id] = (held.num_tokens, None)
            return
        kv.update_block_hashes(req)
        bs = kv.block_size
        blocks = []
        for i in range(min(num_tokens, req.num_prompt_tokens) // bs):
            block = self.pool.lookup(req.block_hashes[i], req.all_token_ids[i * bs:(i + 1) * bs], now)
            if block is None:
                break
            blocks.append(block)
        try:
            self._results[pin_id] = (self.pin(pin_id, blocks, bs, expires_at, now).num_tokens, None)
        except PinRefused as e:
            self._results[pin_id] = (0, str(e))

    # ----------------------------------------------------------------- changes
    def pin(self, pin_id: str, blocks: Sequence[KVBlock], block_size: int, expires_at: float, now: float) -> Pin:
        """Hold ``blocks`` (cached blocks of one prefix, in order) until ``expires_at``.

        An existing pin with the same id is replaced (its references dropped after the new
        ones are taken, so shared blocks never become free in between). PinRefused when
        nothing is cached, the expiry has passed, or the cap would be exceeded.
        """
        if not blocks:
            raise PinRefused("nothing of the prompt is cached to pin (it is shorter than one block)")
        if any(b.block_hash is None for b in blocks):
            raise RuntimeError("only cached blocks can be pinned")
        if expires_at <= now:
            raise PinRefused("the pin's expiry has already passed")
        old = self._pins.get(pin_id)
        others = self.num_pinned_blocks - (len(old.blocks) if old else 0)
        if others + len(blocks) > self.max_blocks:
            raise PinRefused(
                f"pinning {len(blocks)} blocks would exceed this replica's cap of {self.max_blocks} pinned blocks "
                f"({others} already pinned)"
            )
        # The blocks' own TTLs: the pin keeps them alive by refreshing, without lengthening them.
        self.pool.touch(blocks, now, [b.ttl_s for b in blocks])
        pin = Pin(pin_id, list(blocks), len(blocks) * block_size, expires_at, 0.0)
        pin.refresh_at = self._next_refresh(pin, now)
        self._pins[pin_id] = pin
        if old is not None:
            self.pool.free(reversed(old.blocks), now)
        return pin

    def unpin(self, pin_id: str, now: float) -> bool:
        """End a pin now (its blocks become ordinary cache); False if there is none."""
        pin = self._pins.pop(pin_id, None)
        if pin is None:
            return False
        self.pool.free(reversed(pin.blocks), now)
        return True

    def set_expiry(self, pin_id: str, expires_at: float, now: float) -> bool:
        """Move a pin's expiry (a PATCH of the cache's TTL); a past expiry ends it now."""
        pin = self._pins.get(pin_id)
        if pin is None:
            return False
        if expires_at <= now:
            return self.unpin(pin_id, now)
        pin.expires_at = expires_at
        return True

    def maintain(self, now: float) -> list[str]:
        """End the pins whose expiry has come (or whose blocks were uncached by a cache
        reset) and slide the lookup expiry of the others' blocks; returns the ended ids."""
        ended = []
        for pin in list(self._pins.values()):
            if pin.expires_at <= now:
                self.num_expired += 1
                ended.append(pin.pin_id)
                self.unpin(pin.pin_id, now)
            elif any(b.block_hash is None for b in pin.blocks):  # reset_prefix_cache dropped them
                ended.append(pin.pin_id)
                self.unpin(pin.pin_id, now)
            elif now >= pin.refresh_at:
                self.pool.touch(pin.blocks, now, [b.ttl_s for b in pin.blocks])
                self.pool.free(reversed(pin.blocks), now)
                pin.refresh_at = self._next_refresh(pin, now)
        return ended

    @staticmethod
    def _next_refresh(pin: Pin, now: float) -> float:
        """Half the shortest remaining lookup life of the blocks: a late step still finds them."""
        soonest = min(b.expires_at for b in pin.blocks)
        return now + max(soonest - now, 0.0) / 2
