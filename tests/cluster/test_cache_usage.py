"""The prompt-cache accounting behind Anthropic's usage and the per-TTL cache metrics (pure)."""

from __future__ import annotations

from cluster.cache_usage import breakpoint_usage, cache_account, ttl_class
from engine import CacheBreakpoint

BS = 16
FIVE_M, ONE_H = 300.0, 3600.0


def test_ttl_classes_are_the_two_anthropic_ttls_and_everything_else() -> None:
    assert [ttl_class(t) for t in (300, 300.0, 3600, 600, 86400, 1)] == ["5m", "5m", "1h", "other", "other", "other"]


def test_a_cold_request_writes_up_to_its_last_breakpoint_in_full_blocks() -> None:
    # 100-token system prompt marked 1h, 150-token prompt: blocks 0..5 (96 tokens) are
    # covered by the breakpoint, block 6 is not (it ends at 112 > 100).
    u = breakpoint_usage(150, 0, BS, [CacheBreakpoint(100, ONE_H)])
    assert (u.cache_read_input_tokens, u.cache_creation_5m, u.cache_creation_1h) == (0, 0, 96)
    assert u.cache_creation_input_tokens == 96 and u.input_tokens == 150 - 96


def test_a_warm_request_reads_what_the_cold_one_wrote_and_writes_nothing_new() -> None:
    u = breakpoint_usage(150, 96, BS, [CacheBreakpoint(100, ONE_H)])
    assert (u.input_tokens, u.cache_read_input_tokens, u.cache_creation_input_tokens) == (54, 96, 0)


def test_reads_past_the_last_breakpoint_count_as_reads_never_negative_writes() -> None:
    # The engine caches every full block, so an identical prompt reads past the breakpoint.
    u = breakpoint_usage(150, 144, BS, [CacheBreakpoint(100, FIVE_M)])
    assert (u.input_tokens, u.cache_read_input_tokens, u.cache_creation_input_tokens) == (6, 144, 0)


def test_each_block_is_written_under_the_longest_breakpoint_covering_it() -> None:
    # 1h on the system prompt (40 tokens), 5m on the conversation so far (90 tokens),
    # 32 tokens already cached: blocks [32,48) 5m (48 > 40), [48,64) .. [64,80) 5m; the 1h
    # block [16,32) was a read; nothing reaches past 80 (block [80,96) ends after 90).
    bps = [CacheBreakpoint(40, ONE_H), CacheBreakpoint(90, FIVE_M)]
    u = breakpoint_usage(120, 32, BS, bps)
    assert (u.cache_creation_1h, u.cache_creation_5m, u.cache_read_input_tokens) == (0, 48, 32)
    cold = breakpoint_usage(120, 0, BS, bps)
    assert (cold.cache_creation_1h, cold.cache_creation_5m) == (32, 48)
    assert cold.input_tokens + cold.cache_creation_input_tokens + cold.cache_read_input_tokens == 120


def test_no_breakpoint_means_no_cache_write_but_reads_still_count() -> None:
    assert breakpoint_usage(150, 0, BS, []).cache_creation_input_tokens == 0
    warm = breakpoint_usage(150, 128, BS, [])
    assert (warm.input_tokens, warm.cache_read_input_tokens, warm.cache_creation_input_tokens) == (22, 128, 0)


def test_a_breakpoint_shorter_than_a_block_writes_nothing() -> None:
    assert breakpoint_usage(150, 0, BS, [CacheBreakpoint(15, ONE_H)]).cache_creation_input_tokens == 0


def test_the_engine_account_writes_every_full_block_under_its_ttl_class() -> None:
    # 150 tokens, 32 read: 9 full blocks, 2 read, 7 written; the 1h breakpoint covers
    # blocks ending by 100 (blocks 0..5), the rest keep the whole-prompt default (5m).
    acc = cache_account(150, 32, BS, FIVE_M, [CacheBreakpoint(100, ONE_H)])
    assert acc.read == {"5m": 0, "1h": 32, "other": 0}
    assert acc.written == {"5m": 3 * BS, "1h": 4 * BS, "other": 0}


def test_the_engine_account_of_a_plain_request_uses_its_whole_prompt_ttl() -> None:
    acc = cache_account(40, 0, BS, 86400.0)
    assert acc.written == {"5m": 0, "1h": 0, "other": 32} and sum(acc.read.values()) == 0
