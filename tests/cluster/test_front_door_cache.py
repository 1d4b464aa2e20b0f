"""The FrontDoor's cache side, without Ray: breakpoints under ``cache.min_cacheable_tokens``
are dropped before the engine sees them, and a finished request's cache reads and writes
are recorded once, under its surface and TTL classes."""

from __future__ import annotations

import asyncio
from typing import Any

from cluster.config import ServeConfig
from cluster.front_door import FrontDoor, Generation
from cluster.inference import CacheMark, ChatTurn, InferenceRequest
from cluster.wire import ModelInfo, StreamChunk
from tests.engine.tiny_models import VOCAB_SIZE, make_tokenizer

SYSTEM = "s" * 100  # byte-level tokenizer: about a token per character


def _door(min_cacheable: int, recorded: list[tuple[str, Any]]) -> FrontDoor:
    cfg = ServeConfig.model_validate({"model": {"model": "unused"}, "cache": {"min_cacheable_tokens": min_cacheable}})
    door = FrontDoor(cfg, None, "m", make_tokenizer(), record_cache=lambda s, a: recorded.append((s, a)))
    door._info = ModelInfo("m", max_model_len=512, block_size=16, vocab_size=VOCAB_SIZE)  # no decode pool here
    return door


def _request() -> InferenceRequest:
    turns = (ChatTurn("system", SYSTEM), ChatTurn("user", "hi"))
    marks = (CacheMark(0, 10, 3600.0), CacheMark(0, len(SYSTEM), 3600.0))  # ~15 and ~105 tokens in
    return InferenceRequest("r", "m", messages=turns, max_tokens=4, cache_marks=marks, surface="anthropic")


def test_breakpoints_under_the_minimum_cacheable_length_never_reach_the_engine() -> None:
    everything = asyncio.run(_door(0, []).prepare(_request()))[2]
    assert len(everything) == 2 and everything[0].num_tokens < 32 <= everything[1].num_tokens
    gen_request, _, kept = asyncio.run(_door(32, []).prepare(_request()))
    assert kept == everything[1:] and gen_request.params.cache_breakpoints == kept


class _Stream:
    """What a decode handle's streaming call yields: the chunks after the first."""

    def __init__(self, chunks: list[StreamChunk]) -> None:
        self._chunks = iter(chunks)

    def __anext__(self) -> Any:
        async def nxt() -> StreamChunk:
            try:
                return next(self._chunks)
            except StopIteration:
                raise StopAsyncIteration from None
        return nxt()

    def cancel(self) -> None:
        pass


def test_a_finished_request_records_its_cache_tokens_once_under_its_surface() -> None:
    recorded: list[tuple[str, Any]] = []
    door = _door(0, recorded)
    gen_request, _, breakpoints = asyncio.run(door.prepare(_request()))
    n = len(gen_request.prompt_token_ids)

    def chunk(finished: bool) -> StreamChunk:
        return StreamChunk("x", (1,), finished, "length" if finished else None, n, 2 if finished else 1, 16,
                           "local", "r")

    gen = Generation(gen_request, chunk(False), breakpoints, _Stream([chunk(True)]), 5.0,
                     door._cache_metrics("anthropic", gen_request))
    asyncio.run(gen.collect())
    assert len(recorded) == 1
    surface, account = recorded[0]
    full_blocks = n // 16 * 16
    covered = max(bp.num_tokens for bp in breakpoints) // 16 * 16  # the 1h breakpoint's whole blocks
    assert surface == "anthropic" and account.read == {"5m": 0, "1h": 16, "other": 0}
    assert account.written == {"5m": full_blocks - covered, "1h": covered - 16, "other": 0}
