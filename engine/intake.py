"""A caller's ``add_request`` arguments -> a validated :class:`~engine.request.Request`.

Everything a caller can get wrong is refused here with a ``ValueError`` (vLLM style: the
caller's mistake), before anything is queued, so the scheduler only ever sees requests
it can serve.
"""

from __future__ import annotations

from typing import Any

from engine.config import EngineConfig
from engine.detokenizer import StopChecker
from engine.errors import ContextLengthExceeded, InvalidTokenIds
from engine.request import Request
from engine.sampling_params import SamplingParams


def make_request(
    request_id: str,
    prompt_token_ids: list[int],
    params: SamplingParams,
    *,
    config: EngineConfig,
    vocab_size: int,
    max_model_len: int,
    tokenizer: Any | None,
    remote_prefill: bool = False,
    export_from_block: int | None = None,
) -> Request:
    """Check the request against the model and the engine's role; build its state."""
    check_tokens(prompt_token_ids, params, vocab_size, max_model_len)
    ttl = params.cache_ttl_s if params.cache_ttl_s is not None else config.default_ttl_s
    if ttl > config.max_ttl_s:
        raise ValueError(f"cache TTL {ttl:g}s exceeds the maximum of {config.max_ttl_s:g}s")
    for bp in params.cache_breakpoints:
        if bp.ttl_s > config.max_ttl_s:
            raise ValueError(f"cache breakpoint TTL {bp.ttl_s:g}s exceeds the maximum of {config.max_ttl_s:g}s")
    if remote_prefill and config.role != "decode":
        raise ValueError("remote_prefill needs an engine with role='decode'")
    if export_from_block is not None and config.role != "prefill":
        raise ValueError("export_from_block needs an engine with role='prefill'")
    if config.role == "prefill" and export_from_block is None:
        export_from_block = 0  # a prefill replica always exports; by default the whole prompt
    return Request(
        request_id=request_id,
        prompt_token_ids=prompt_token_ids,
        params=params,
        ttl_s=ttl,
        stop_checker=StopChecker(tokenizer, list(params.stop)),
        remote_prefill=remote_prefill,
        export_from_block=export_from_block,
    )


def check_tokens(ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int) -> None:
    """Refuse a prompt and params the model cannot serve (also called by the serving ingress,
    which refuses them before a replica sees them)."""
    if not ids:
        raise InvalidTokenIds("the prompt is empty", field="prompt")
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise InvalidTokenIds(f"prompt token ids must be in [0, {vocab_size}); got {min(ids)}..{max(ids)}",
                              field="prompt")
    if params.logit_bias and max(params.logit_bias) >= vocab_size:
        raise InvalidTokenIds(f"logit_bias token ids must be in [0, {vocab_size}); got {max(params.logit_bias)}",
                              field="logit_bias")
    if len(ids) + params.max_tokens > max_model_len:
        raise ContextLengthExceeded(
            f"the prompt has {len(ids)} tokens and max_tokens is {params.max_tokens}: "
            f"{len(ids) + params.max_tokens} exceeds this model's context of {max_model_len} tokens",
            max_model_len=max_model_len,
        )
