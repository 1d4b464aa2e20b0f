"""Every value that crosses a Ray Serve handle, in one place: typed, frozen, picklable.

Ingress -> decode replica: :class:`GenerateRequest`; the decode replica streams back
:class:`StreamChunk` values, or one :class:`ApiError` (as a value, then the stream ends).
Decode replica -> prefill replica: :class:`PrefillRequest`, answered by
:class:`PrefillResult` or :class:`PrefillRefused`. Any replica -> callers:
:class:`ModelInfo` and :class:`ReplicaStats`. Inside a replica, the event loop -> step
thread: one frozen command per engine call (:data:`EngineCommand`).

``ApiError`` is both the exception the HTTP layer renders (status, OpenAI ``type``,
message, ``param``, machine-readable ``code``) and the value a replica yields instead of
raising across a handle; nobody parses a message to pick a status.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cluster.transport.base import TransportEndpoint
from engine.outputs import EngineStats, TokensByTier
from engine.sampling_params import SamplingParams

# Machine-readable error codes (production-stack style: "503 PREFILL_POOL_UNAVAILABLE: ...").
DECODE_POOL_UNAVAILABLE = "DECODE_POOL_UNAVAILABLE"
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
MODEL_NOT_FOUND = "model_not_found"
REQUEST_TIMEOUT = "REQUEST_TIMEOUT"
INTERNAL_ERROR = "INTERNAL_ERROR"
REQUEST_TOO_LARGE = "request_too_large"
INVALID_API_KEY = "invalid_api_key"
SERVER_OVERLOADED = "server_overloaded"

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}

class ApiError(Exception):
    """An error meant for the client: HTTP status, message, OpenAI ``type``, ``param``, ``code``."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,  # noqa: A002 - OpenAI's field name
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPE_BY_STATUS.get(status_code, "server_error")

    def body(self) -> dict[str, dict[str, str | None]]:
        """The OpenAI error envelope."""
        return error_body(self.message, self.type, self.param, self.code)

    def __reduce__(self) -> tuple:
        # Keyword-only arguments would otherwise be lost when Ray pickles the error.
        return (_rebuild_api_error, (self.status_code, self.message, self.code, self.param, self.type))

    def __repr__(self) -> str:
        return f"ApiError({self.status_code}, {self.message!r}, code={self.code!r}, param={self.param!r})"


def _rebuild_api_error(status: int, message: str, code: str | None, param: str | None, type_: str) -> ApiError:
    return ApiError(status, message, code=code, param=param, type=type_)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    """``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass(frozen=True)
class ModelInfo:
    """Immutable facts about the served model, read once from a replica's engine."""

    model_id: str
    max_model_len: int
    block_size: int
    vocab_size: int


@dataclass(frozen=True)
class PinAsk:
    """Pin the first ``num_tokens`` prompt tokens under ``pin_id`` until ``expires_at``
    (wall clock) once the request finishes: an explicit cache (``engine.pins``)."""

    pin_id: str
    expires_at: float
    num_tokens: int


@dataclass(frozen=True)
class GenerateRequest:
    """Ingress -> decode (or mixed) replica: one request, already tokenized and validated."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    # max_tokens is final (the ingress fills the default); cache_ttl_s is clamped.
    params: SamplingParams
    # The request field prompt errors name: "messages" (chat) or "prompt" (completions).
    prompt_param: str = "prompt"
    # Explicit caches: pin the prompt's prefix on the replica that serves it.
    pin: PinAsk | None = None


@dataclass(frozen=True)
class StreamChunk:
    """Decode replica -> ingress: one engine output of a request."""

    new_text: str
    new_token_ids: tuple[int, ...]
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    # Which replicas served the request ("local": the decode replica prefilled it).
    prefill_replica: str
    decode_replica: str
    # Finished chunk of a request with a PinAsk: prompt tokens pinned (0: refused, see pin_refusal).
    pinned_tokens: int = 0
    pin_refusal: str | None = None
    # The stop string that ended the request (finished chunk only; None: EOS or no stop).
    stop_string: str | None = None
    # cached_tokens split by the KV tier the blocks came from.
    cached_tokens_by_tier: TokensByTier = TokensByTier()


# What a decode replica's stream yields: chunks, or one error and nothing after it.
StreamItem = StreamChunk | ApiError


@dataclass(frozen=True)
class PrefillRequest:
    """Decode replica -> prefill replica: compute a prompt and push blocks from ``first_block_index``."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    first_block_index: int
    # Where the decode replica receives the KV.
    endpoint: TransportEndpoint
    transfer_id: int

    @property
    def prefill_request_id(self) -> str:
        """The prefill side's id: the decode replica may retry the same request after a failure."""
        return f"{self.request_id}@{self.transfer_id}"


@dataclass(frozen=True)
class PrefillResult:
    """Prefill replica -> decode replica: the first token, and where the KV buffer travels."""

    first_token_id: int
    num_cached_tokens: int
    group_id: str
    shape: tuple[int, ...]
    dtype: str
    # The transport backend carrying the KV ("gloo", "nccl", "cuda_ipc").
    backend: str
    replica_id: str
    # num_cached_tokens split by the KV tier the prefill replica found the blocks in.
    cached_tokens_by_tier: TokensByTier = TokensByTier()


@dataclass(frozen=True)
class PrefillRefused:
    """Prefill replica -> decode replica: this request was not prefilled (the decode side recomputes)."""

    reason: str


@dataclass(frozen=True)
class ReplicaStats:
    """A replica's engine load plus its transfer counters (tests, operators, metrics)."""

    replica_id: str
    role: str
    engine: EngineStats
    # Decode role: prompts prefilled remotely, and transfers that fell back to local recompute.
    num_remote_prefills: int = 0
    num_transfer_failures: int = 0
    # Prefill role: KV buffers delivered, and sends that failed.
    num_sent: int = 0
    num_send_failures: int = 0


# --------------------------------------------------------------------------- step-thread commands
#
# What the replica's event loop asks of its engine, queued to the step thread
# (``cluster.engine_loop.EngineLoop.submit``) and run there between two steps. Each is a
# frozen value with one ``apply(engine)``: the engine is touched by one thread only.


@dataclass(frozen=True)
class AddRequest:
    """Queue a request (``remote_prefill``: decode role; ``export_from_block``: prefill role)."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    remote_prefill: bool = False
    export_from_block: int | None = None
    pin: PinAsk | None = None

    def apply(self, engine: Any) -> None:
        engine.add_request(self.request_id, list(self.prompt_token_ids), self.params,
                           remote_prefill=self.remote_prefill, export_from_block=self.export_from_block)
        if self.pin is not None:
            engine.pin_on_finish(self.request_id, self.pin.pin_id, self.pin.expires_at, self.pin.num_tokens)


@dataclass(frozen=True)
class Abort:
    """Stop a request and free its blocks (unknown ids are ignored)."""

    request_id: str

    def apply(self, engine: Any) -> None:
        engine.abort(self.request_id)


@dataclass(frozen=True)
class GetStats:
    """A fresh ``EngineStats``."""

    def apply(self, engine: Any) -> EngineStats:
        return engine.stats()


@dataclass(frozen=True)
class GetCacheSnapshot:
    """Every cached block now (the KV directory rebuilds from it)."""

    def apply(self, engine: Any) -> Any:
        return engine.cache_snapshot()


@dataclass(frozen=True)
class ReadExport:
    """Prefill role: a contiguous copy of exported blocks, ready to send."""

    block_ids: tuple[int, ...]

    def apply(self, engine: Any) -> Any:
        return engine.kv_transfer.read_blocks(list(self.block_ids))


@dataclass(frozen=True)
class ReleaseExport:
    """Prefill role: the receiver has the blocks (or gave up); end the lease."""

    request_id: str

    def apply(self, engine: Any) -> None:
        engine.kv_transfer.release_export(self.request_id)


@dataclass(frozen=True)
class LandRemoteKV:
    """Decode role: write received KV into the reserved blocks and resume the request.

    ``apply`` returns False (and writes nothing) if the request stopped waiting meanwhile:
    an aborted request's blocks may already belong to someone else.
    """

    request_id: str
    block_ids: tuple[int, ...]
    buffer: Any  # torch.Tensor (L, 2, n, block_size, H_kv, D)
    first_token_id: int
    num_cached_tokens: int
    cached_tokens_by_tier: TokensByTier | None = None

    def apply(self, engine: Any) -> bool:
        kv = engine.kv_transfer
        if not kv.is_waiting(self.request_id):
            return False
        kv.write_blocks(list(self.block_ids), self.buffer)
        kv.complete(self.request_id, self.first_token_id, self.num_cached_tokens, self.cached_tokens_by_tier)
        return True


@dataclass(frozen=True)
class FailRemoteKV:
    """Decode role: the remote prefill failed; recompute the prompt locally."""

    request_id: str

    def apply(self, engine: Any) -> None:
        engine.kv_transfer.fail(self.request_id)


@dataclass(frozen=True)
class PinResult:
    """(tokens pinned, why not) of the request that asked to pin ``pin_id``."""

    pin_id: str

    def apply(self, engine: Any) -> tuple[int, str | None]:
        return engine.pins.result(self.pin_id)


@dataclass(frozen=True)
class ListPins:
    """The ids of the engine's pins."""

    def apply(self, engine: Any) -> list[str]:
        return engine.pins.ids()


@dataclass(frozen=True)
class SyncPins:
    """Keep the pins the registry still lists (with its expiry), release the others."""

    checked: tuple[str, ...]
    live: dict[str, float]

    def apply(self, engine: Any) -> int:
        now, released = engine.clock(), 0
        for pin_id in self.checked:
            if pin_id in self.live:
                engine.pins.set_expiry(pin_id, self.live[pin_id], now)
            else:
                released += engine.pins.unpin(pin_id, now)
        return released


EngineCommand = (AddRequest | Abort | GetStats | GetCacheSnapshot | ReadExport | ReleaseExport | LandRemoteKV
                 | FailRemoteKV | PinResult | ListPins | SyncPins)
