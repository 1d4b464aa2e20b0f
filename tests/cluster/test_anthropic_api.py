"""The Anthropic Messages API, called with the real ``anthropic`` SDK pointed at kvferry.

One colocated replica of the tiny random Llama on the session's Ray cluster, with API keys
(the SDK's ``x-api-key`` is the tenant) and a minimum cacheable length of 32 tokens. A
second call with the same cached system prompt reads what the first wrote, greedy text is
the same, the streaming helper sees the same text and usage, stop sequences and max_tokens
give their stop reasons, count_tokens equals the prompt a generate call reports, and bad
requests come back as the SDK's typed exceptions.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

anthropic = pytest.importorskip("anthropic")

from tests.cluster.conftest import deploy_app  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

APP = "kvferry-anthropic"
KEY = "sk-ant-kvferry-test-4c9d"
GREEDY = {"temperature": 0}  # the current SDK has no sampling arguments: extra_body carries them


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    keys = tmp_path_factory.mktemp("anthropic-keys") / "api_keys"
    keys.write_text(f"{KEY}\n")
    settings = {
        "mode": "colocated",
        "mixed": {"num_replicas": 1},
        "model": {"model": str(tiny_model)},
        "engine": {"num_kv_blocks": 256, "block_size": 16},
        "auth": {"api_keys_file": str(keys)},
        "cache": {"min_cacheable_tokens": 32},
    }
    with deploy_app(APP, settings) as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server: str):
    with anthropic.Anthropic(base_url=server, api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def model(server: str) -> str:
    import httpx

    return httpx.get(server + "/v1/models", headers={"x-api-key": KEY}, timeout=60).json()["data"][0]["id"]


def _system(ttl: str = "1h") -> list[dict]:
    """A fresh system prompt (~150 tokens: the tokenizer is byte-level) marked for caching."""
    text = f"{uuid.uuid4().hex} You answer in haiku. " + "The ferry carries the cache across. " * 4
    return [{"type": "text", "text": text, "cache_control": {"type": "ephemeral", "ttl": ttl}}]


def _prompt_tokens(usage) -> int:
    return usage.input_tokens + usage.cache_creation_input_tokens + usage.cache_read_input_tokens


def test_a_cached_system_prompt_is_written_then_read_with_the_same_text(client, model) -> None:
    system = _system("1h")
    ask = {"model": model, "max_tokens": 8, "system": system, "extra_body": GREEDY}
    first = client.messages.create(messages=[{"role": "user", "content": "Hi"}], **ask)
    assert first.usage.cache_read_input_tokens == 0
    assert first.usage.cache_creation_input_tokens >= 128  # the system prompt's full blocks
    assert first.usage.cache_creation.ephemeral_1h_input_tokens == first.usage.cache_creation_input_tokens
    second = client.messages.create(messages=[{"role": "user", "content": "Hi"}], **ask)
    assert second.usage.cache_read_input_tokens >= first.usage.cache_creation_input_tokens
    assert second.usage.cache_creation_input_tokens == 0
    assert second.content[0].text == first.content[0].text and second.stop_reason in ("end_turn", "max_tokens")
    assert _prompt_tokens(second.usage) == _prompt_tokens(first.usage)
    counted = client.messages.count_tokens(model=model, system=system, messages=[{"role": "user", "content": "Hi"}])
    assert counted.input_tokens == _prompt_tokens(first.usage)
    assert second.usage.output_tokens == 8 or second.stop_reason == "end_turn"


def test_a_breakpoint_under_the_minimum_cacheable_length_writes_nothing(client, model) -> None:
    short = [{"type": "text", "text": uuid.uuid4().hex[:12], "cache_control": {"type": "ephemeral"}}]
    r = client.messages.create(model=model, max_tokens=2, system=short, messages=[{"role": "user", "content": "Hi"}])
    assert r.usage.cache_creation_input_tokens == 0 and r.usage.cache_read_input_tokens == 0


def test_streaming_through_the_sdk_helper_matches_the_plain_call(client, model) -> None:
    ask = {"model": model, "max_tokens": 12, "system": _system("5m"), "extra_body": GREEDY,
           "messages": [{"role": "user", "content": "Tell me about ferries."}]}
    plain = client.messages.create(**ask)
    with client.messages.stream(**ask) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == plain.content[0].text == final.content[0].text
    assert final.stop_reason == plain.stop_reason and final.usage.output_tokens == plain.usage.output_tokens
    assert final.usage.cache_read_input_tokens >= plain.usage.cache_creation_input_tokens > 0
    assert plain.usage.cache_creation.ephemeral_5m_input_tokens == plain.usage.cache_creation_input_tokens
    assert _prompt_tokens(final.usage) == _prompt_tokens(plain.usage)


def test_stop_sequences_and_max_tokens_give_their_stop_reasons(client, model) -> None:
    ask = {"model": model, "messages": [{"role": "user", "content": "Count with me: one, two,"}]}
    full = client.messages.create(max_tokens=24, extra_body=GREEDY, **ask)
    assert full.stop_reason == "max_tokens" and full.usage.output_tokens == 24
    text = full.content[0].text
    stop = next(text[i:i + 2] for i in range(3, len(text) - 1) if text[i:i + 2].isprintable() and text[i:i + 2].strip())
    cut = client.messages.create(max_tokens=24, extra_body={**GREEDY, "stop_sequences": [stop, "\x00never"]}, **ask)
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", stop)
    assert cut.content[0].text == text[: text.index(stop)]


def test_errors_are_the_sdks_typed_exceptions(client, server, model) -> None:
    block = {"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}
    with pytest.raises(anthropic.BadRequestError, match="maximum of 4 blocks"):
        client.messages.create(model=model, max_tokens=1, system=[block] * 4, messages=[
            {"role": "user", "content": [block]}])
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="claude-nope", max_tokens=1, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["error"]["type"] == "not_found_error"
    with anthropic.Anthropic(base_url=server, api_key="sk-wrong", max_retries=0) as stranger:
        with pytest.raises(anthropic.AuthenticationError):
            stranger.messages.create(model=model, max_tokens=1, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        client.messages.create(model=model, max_tokens=1_000_000, messages=[{"role": "user", "content": "x"}])
