"""``cluster.grpc.adapter.GrpcSurface`` alone (no Ray, no server): keys, status codes, answer
counting, and that every way a call ends cancels its generation (the engine frees the blocks).
The FrontDoor and Serve's gRPC context are test doubles here; ``test_grpc.py`` runs the real ones."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from cluster.auth import ApiKeys
from cluster.front_door import Generation
from cluster.grpc import kvferry_pb2 as pb
from cluster.grpc.adapter import GrpcSurface, StatusSet
from cluster.wire import ApiError, GenerateRequest, StreamChunk
from engine import SamplingParams

KEY = "sk-unit"


class Context:
    """The part of Serve's RayServegRPCContext the adapter uses."""

    def __init__(self, key: str | None = KEY) -> None:
        self.metadata = [("authorization", f"Bearer {key}")] if key else []
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.trailers: list[tuple[str, str]] = [("request_id", "rid-1")]

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self.metadata

    def trailing_metadata(self) -> list[tuple[str, str]]:
        return self.trailers

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, md: list[tuple[str, str]]) -> None:
        self.trailers = self.trailers + md


def _chunk(text: str, finished: bool) -> StreamChunk:
    return StreamChunk(text, (1,), finished, "length" if finished else None, 4, 2, 0, "local", "mixed#1")


class Stream:
    """A decode-pool stream: chunks, then (optionally) hangs until cancelled."""

    def __init__(self, items: list[Any], hang: bool = False) -> None:
        self.items, self.hang, self.cancelled = list(items), hang, False

    async def __anext__(self) -> Any:
        if not self.items:
            if self.hang:
                await asyncio.sleep(3600)
            raise StopAsyncIteration
        return self.items.pop(0)

    def cancel(self) -> None:
        self.cancelled = True


class Door:
    model_name = "m"
    front_engine = SimpleNamespace(default_ttl_s=300.0)

    def __init__(self, stream: Stream | None = None, error: ApiError | None = None) -> None:
        self.stream, self.error, self.requests = stream, error, []

    async def open(self, req: Any) -> Generation:
        self.requests.append(req)
        if self.error:
            raise self.error
        first = await self.stream.__anext__()
        return Generation(GenerateRequest(req.request_id, (1, 2), SamplingParams()), first, (), self.stream, 5.0)

    async def model_info(self) -> Any:
        return SimpleNamespace(max_model_len=64)


def _surface(door: Door, answers: list[tuple[str, str, str]]) -> GrpcSurface:
    return GrpcSurface(door, lambda: ApiKeys([KEY]), lambda: lambda *a: answers.append(a))


CHAT = pb.ChatRequest(model="m", messages=[pb.ChatMessage(role="user", content="hi")])


def test_unary_answers_with_usage_and_names_the_replicas() -> None:
    answers: list = []
    door, ctx = Door(Stream([_chunk("a", False), _chunk("b", True)])), Context()
    out = asyncio.run(_surface(door, answers).unary(CHAT, ctx, chat=True))
    assert (out.content, out.finish_reason, out.usage.completion_tokens, out.id) == ("ab", "length", 2, "chatcmpl-rid-1")
    assert door.requests[0].surface == "grpc" and door.requests[0].api_key == KEY
    assert ("x-kvferry-decode-replica", "mixed#1") in ctx.trailers and ctx.code is None
    assert answers == [("/kvferry.v1.Inference/Chat", "200", "ok")]


@pytest.mark.parametrize(("key", "message"), [(None, "Missing API key"), ("sk-wrong", "Incorrect API key")])
def test_a_bad_key_is_unauthenticated_before_the_door_opens(key: str | None, message: str) -> None:
    answers: list = []
    door, ctx = Door(Stream([])), Context(key)
    out = asyncio.run(_surface(door, answers).unary(CHAT, ctx, chat=False))
    assert out == pb.CompletionResponse() and ctx.code == grpc.StatusCode.UNAUTHENTICATED
    assert ctx.details.startswith(message) and door.requests == []
    assert answers == [("/kvferry.v1.Inference/Complete", "401", "invalid_api_key")]


def test_a_refused_stream_raises_with_the_code_set() -> None:
    answers: list = []
    ctx = Context()
    door = Door(error=ApiError(404, "no such model", code="model_not_found"))

    async def drain() -> None:
        async for _ in _surface(door, answers).stream(CHAT, ctx, chat=True):
            pass

    with pytest.raises(StatusSet):
        asyncio.run(drain())
    assert (ctx.code, ctx.details) == (grpc.StatusCode.NOT_FOUND, "no such model")
    assert answers == [("/kvferry.v1.Inference/ChatStream", "404", "model_not_found")]


def test_a_cancelled_call_cancels_its_generation() -> None:
    """A deadline or a cancel is a CancelledError in the method: the engine must hear of it."""
    for streamed in (False, True):
        answers: list = []
        stream = Stream([_chunk("a", False)], hang=True)
        surface = _surface(Door(stream), answers)

        async def call() -> None:
            if streamed:
                async for _ in surface.stream(CHAT, Context(), chat=True):
                    pass
            else:
                await surface.unary(CHAT, Context(), chat=True)

        async def cancel_soon() -> None:
            task = asyncio.ensure_future(call())
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(cancel_soon())
        assert stream.cancelled
        assert answers == [(f"/kvferry.v1.Inference/{'ChatStream' if streamed else 'Chat'}", "499", "client_cancelled")]
