"""Gemini edge parsing (``cluster.gemini_protocol``) and per-path error shapes, without Ray."""

from __future__ import annotations

import pytest

from cluster.error_shapes import render_error
from cluster.gemini_protocol import Content, format_time, google_error_body, parse_duration, parse_time, to_turns
from cluster.inference import ChatTurn
from cluster.wire import ApiError


def test_durations_and_times() -> None:
    assert parse_duration("600s") == 600.0 and parse_duration("1.5s") == 1.5
    for bad in ("600", "10m", "-5s", "s", "1e3s"):
        with pytest.raises(ApiError) as e:
            parse_duration(bad)
        assert e.value.status_code == 400 and e.value.param == "ttl"
    t = parse_time("2026-01-01T00:00:00Z")
    assert t == parse_time("2026-01-01T01:00:00+01:00")
    assert format_time(t) == "2026-01-01T00:00:00.000000Z" and parse_time(format_time(t + 0.25)) == t + 0.25
    with pytest.raises(ApiError, match="zone"):
        parse_time("2026-01-01T00:00:00")


def test_contents_become_chat_turns() -> None:
    system = Content.model_validate({"parts": [{"text": "be brief"}]})
    contents = [Content.model_validate(c) for c in (
        {"role": "user", "parts": [{"text": "a"}, {"text": "b"}]}, {"role": "model", "parts": [{"text": "c"}]},
        {"parts": [{"text": "d"}]})]
    assert to_turns(contents, system) == (ChatTurn("system", "be brief"), ChatTurn("user", "ab"),
                                          ChatTurn("assistant", "c"), ChatTurn("user", "d"))
    with pytest.raises(ApiError, match="'user' or 'model'"):
        to_turns([Content.model_validate({"role": "tool", "parts": []})], None)
    with pytest.raises(ApiError, match="only text parts"):
        to_turns([Content.model_validate({"parts": [{"inlineData": {"data": "AA=="}}]})], None)


def test_errors_take_the_shape_of_their_path() -> None:
    err = ApiError(429, "budget is full", code="RESOURCE_EXHAUSTED")
    assert render_error("/v1beta/cachedContents", err) == (429, {
        "error": {"code": 429, "message": "budget is full", "status": "RESOURCE_EXHAUSTED"}})
    assert render_error("/v1/chat/completions", err) == (429, err.body())
    assert google_error_body(ApiError(404, "x"))["error"]["status"] == "NOT_FOUND"
