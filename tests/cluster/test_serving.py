"""End to end on a real local Ray cluster: the disaggregated app behind the OpenAI client.

One tiny random Llama (byte-level tokenizer, built on the fly), one prefill and one decode
replica on the CPU, deployed once for the module and always shut down. References come
from the very same engine run offline in this process (``role="mixed"``).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from tests.cluster.conftest import deploy_app

pytestmark = [pytest.mark.ray, pytest.mark.slow]

APP = "kvferry-test"
LONG_SYSTEM = "You ferry KV blocks across the river, carefully and quickly. " * 4  # ~250 tokens


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_model: Path):
    settings = {
        "model": {"model": str(tiny_model)},
        "engine": {"num_kv_blocks": 256, "block_size": 16, "local_prefill_threshold": 8},
        "transport": {"transfer_timeout_s": 3.0, "connect_timeout_s": 10.0},
        "http": {"prefill_timeout_s": 30.0},
    }
    with deploy_app(APP, settings) as (url, cfg):
        yield {"url": url, "cfg": cfg}


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_name(client) -> str:
    return client.models.list().data[0].id


def _ref_chat(engine, messages: list[dict], max_tokens: int) -> str:
    from engine import SamplingParams

    ids = engine.encode_chat(messages)
    return engine.generate([ids], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))[0].text


def test_models_and_health(server, model_name: str) -> None:
    assert model_name == "llama"
    assert httpx.get(server["url"] + "/health").json() == {"status": "ok"}


def test_chat_greedy_matches_single_engine_and_names_both_replicas(client, model_name, reference_engine) -> None:
    messages = [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "hello there"}]
    raw = client.chat.completions.with_raw_response.create(
        model=model_name, messages=messages, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    resp = raw.parse()
    prefill_replica = raw.headers["x-kvferry-prefill-replica"]
    decode_replica = raw.headers["x-kvferry-decode-replica"]
    # Exactly one request id, and it is the one the response is named after.
    assert len(raw.headers.get_list("x-request-id")) == 1
    assert raw.parse().id == "chatcmpl-" + raw.headers["x-request-id"]
    # The long prompt was prefilled remotely: two different replicas served it.
    assert prefill_replica != "local" and "prefill" in prefill_replica
    assert "decode" in decode_replica and prefill_replica != decode_replica
    assert resp.choices[0].message.content == _ref_chat(reference_engine, messages, 12)
    assert resp.usage.completion_tokens == 12
    assert resp.usage.prompt_tokens_details.cached_tokens == 0

    # Same prompt again: the decode replica's prefix cache serves it, same answer. A longer
    # retention than the server's maximum is clamped, not refused.
    again = client.chat.completions.create(
        model=model_name, messages=messages, max_tokens=12, temperature=0,
        extra_body={"ignore_eos": True, "prompt_cache_retention": "24h"},
    )
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    assert again.choices[0].message.content == resp.choices[0].message.content
    # kvferry's usage extension splits the cached tokens by KV tier (no host/disk tier here).
    assert again.usage.kvferry == {"cached_tokens_by_tier": {
        "device": again.usage.prompt_tokens_details.cached_tokens, "host": 0, "disk": 0}}

    # Another API key is another tenant: no hit on this tenant's cache, same answer.
    from openai import OpenAI

    other = OpenAI(base_url=str(client.base_url), api_key="another-tenant", max_retries=0, timeout=120)
    theirs = other.chat.completions.create(
        model=model_name, messages=messages, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert theirs.usage.prompt_tokens_details.cached_tokens == 0
    assert theirs.choices[0].message.content == resp.choices[0].message.content


def test_streamed_chat_and_completions(client, model_name, reference_engine) -> None:
    from engine import SamplingParams

    messages = [{"role": "user", "content": "stream me a story about ferries " * 3}]
    stream = client.chat.completions.create(
        model=model_name, messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _ref_chat(reference_engine, messages, 10)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    prompt = "The river carried blocks of memory from one bank to the other, " * 2
    ref = reference_engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    plain = client.completions.create(model=model_name, prompt=prompt, max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert plain.choices[0].text == ref.text
    assert plain.usage.prompt_tokens == ref.num_prompt_tokens and plain.usage.completion_tokens == 8
    streamed = client.completions.create(model=model_name, prompt=prompt, max_tokens=8, temperature=0,
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == ref.text


def test_transfer_failure_recomputes_locally(server, client, model_name, reference_engine) -> None:
    from ray import serve

    decode = serve.get_deployment_handle("decode", app_name=APP)
    decode.inject_transfer_failures.remote(1).result()
    messages = [{"role": "user", "content": "a fresh prompt nobody has cached yet, about tides " * 3}]
    raw = client.chat.completions.with_raw_response.create(
        model=model_name, messages=messages, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert raw.headers["x-kvferry-prefill-replica"] == "local"
    assert raw.parse().choices[0].message.content == _ref_chat(reference_engine, messages, 8)
    stats = decode.stats.remote().result()
    assert stats.num_transfer_failures >= 1
    # The transport re-pairs and ferries KV again right afterwards.
    messages2 = [{"role": "user", "content": "another fresh prompt after the failure, about quays " * 3}]
    raw2 = client.chat.completions.with_raw_response.create(
        model=model_name, messages=messages2, max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
    )
    assert raw2.headers["x-kvferry-prefill-replica"] != "local"
    assert raw2.parse().choices[0].message.content == _ref_chat(reference_engine, messages2, 4)


def test_sixteen_concurrent_streams_complete(server, model_name) -> None:
    from openai import AsyncOpenAI

    async def run() -> list[tuple[str, int]]:
        aclient = AsyncOpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=180)

        async def one(i: int) -> tuple[str, int]:
            stream = await aclient.chat.completions.create(
                model=model_name, messages=[{"role": "user", "content": f"request {i}: " + "tell a tale " * (i + 1)}],
                max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            text, usage = "", None
            async for c in stream:
                if c.choices:
                    text += c.choices[0].delta.content or ""
                if c.usage:
                    usage = c.usage
            return text, usage.completion_tokens

        try:
            return await asyncio.gather(*(one(i) for i in range(16)))
        finally:
            await aclient.close()

    results = asyncio.run(run())
    assert len(results) == 16 and all(n == 6 for _, n in results)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        ({"model": "M", "messages": "hi"}, 400, "messages"),
        ({"model": "M", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "M", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
        ({"model": "M", "messages": [{"role": "user", "content": "x" * 600}]}, 400, "messages"),
        ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ],
)
def test_bad_input_gets_openai_error_and_server_keeps_serving(server, model_name, body, status, param) -> None:
    url = server["url"] + "/v1/chat/completions"
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)
    else:
        r = httpx.post(url, content=json.dumps(body).replace('"M"', json.dumps(model_name)), timeout=60,
                       headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    assert len(r.headers.get_list("x-request-id")) == 1
    assert "Traceback" not in r.text
    if status == 404:
        assert err["code"] == "model_not_found"
    ok = httpx.post(url, json={"model": model_name, "messages": [{"role": "user", "content": "ok?"}], "max_tokens": 2},
                    timeout=60)
    assert ok.status_code == 200


def test_bench_against_the_server(server, tmp_path: Path) -> None:
    from cluster.bench import BenchConfig, run_bench, write_json

    cfg = BenchConfig(url=server["url"], num_conversations=2, turns=2, concurrency=2, max_tokens=4,
                      system_words=10, user_words=3)
    t0 = time.monotonic()
    summary = asyncio.run(run_bench(cfg))
    assert summary["num_ok"] == summary["num_requests"] == 4, summary["errors"]
    assert summary["ttft_s"]["p50"] > 0 and summary["e2e_s"]["p99"] >= summary["ttft_s"]["p50"]
    # Turn 2 of each conversation (and the shared system prompt) hit the prompt cache.
    assert summary["cached_token_ratio"] > 0
    assert summary["wall_s"] <= time.monotonic() - t0 + 1
    write_json(tmp_path / "b.json", summary)
    assert json.loads((tmp_path / "b.json").read_text())["num_ok"] == 4


def test_replica_metrics_reach_prometheus(ray_cluster, server, client, model_name) -> None:
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    client.completions.create(model=model_name, prompt="metrics please " * 4, max_tokens=2)
    wanted = ("kvferry_ttft_seconds_bucket", "kvferry_remote_prefills_total", "kvferry_kv_usage")
    # Only this app's series count: other modules' apps leave theirs on the same node.
    deadline, ours = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        except httpx.HTTPError:
            text = ""
        ours = "\n".join(line for line in text.splitlines() if f'application="{APP}"' in line)
        if all(name in ours for name in wanted):
            break
        time.sleep(2)
    assert 'deployment="decode"' in ours
    for name in wanted:
        assert name in ours, name
