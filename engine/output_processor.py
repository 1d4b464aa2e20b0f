"""What a new token means for its request: whether it stops, and the output handed out.

Pure functions of a :class:`~engine.request.Request` (and its ``stop_checker``): the
engine appends the token, asks :func:`stop_status`, finishes the request in the
scheduler if needed, then builds the step's :class:`~engine.outputs.RequestOutput`.
"""

from __future__ import annotations

from collections.abc import Collection

from engine.outputs import KVExport, RequestOutput
from engine.request import Request, RequestStatus


def stop_status(req: Request, eos_token_ids: Collection[int], max_model_len: int) -> RequestStatus | None:
    """The finished status ``req``'s newest token leads to, or None to keep generating.

    Updates the request's text on the way (stop strings are found in the text).
    """
    token = req.output_token_ids[-1]
    params = req.params
    checker = req.stop_checker
    if token in params.stop_token_ids or (not params.ignore_eos and token in eos_token_ids):
        checker.update(req.output_token_ids[:-1])  # the stop token is not text
        return RequestStatus.FINISHED_STOPPED
    if checker.update(req.output_token_ids):
        return RequestStatus.FINISHED_STOPPED
    if req.num_output_tokens >= params.max_tokens or req.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH
    return None


def make_output(req: Request, kv_export: KVExport | None = None) -> RequestOutput:
    """``req``'s progress: everything so far plus what is new since its previous output."""
    checker = req.stop_checker
    finished = req.status.finished
    if finished:
        checker.flush()
    new_text = checker.delta(finished)
    new_ids = req.output_token_ids[req.num_emitted_tokens :]
    req.num_emitted_tokens = req.num_output_tokens
    return RequestOutput(
        request_id=req.request_id,
        prompt_token_ids=req.prompt_token_ids,
        token_ids=list(req.output_token_ids),
        new_token_ids=new_ids,
        text=checker.text[: checker.emitted],
        new_text=new_text,
        finished=finished,
        finish_reason=req.status.finish_reason,
        num_prompt_tokens=req.num_prompt_tokens,
        num_cached_tokens=max(req.num_cached_tokens, 0),
        cached_tokens_by_tier=req.cached_tokens_by_tier,
        kv_export=kv_export,
        stop_string=checker.matched if finished else None,
    )


def make_error_output(req: Request, message: str) -> RequestOutput:
    """The final output of a request that failed alone: ``finish_reason="error"``, the
    tokens so far, no text, and ``message`` for the client (never a trace)."""
    return RequestOutput(
        request_id=req.request_id,
        prompt_token_ids=req.prompt_token_ids,
        token_ids=list(req.output_token_ids),
        new_token_ids=[],
        text="",
        new_text="",
        finished=True,
        finish_reason=RequestStatus.FINISHED_ERROR.finish_reason,
        num_prompt_tokens=req.num_prompt_tokens,
        num_cached_tokens=max(req.num_cached_tokens, 0),
        cached_tokens_by_tier=req.cached_tokens_by_tier,
        error=message,
    )
