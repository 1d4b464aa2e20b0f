"""Load generator for a running kvferry (or any OpenAI-compatible) server.

Workload: multi-turn chats. Each conversation shares a long system prompt with the others
and grows turn by turn (the assistant's replies are appended), so a prompt cache that
keeps conversations pays off. Conversations start either at fixed concurrency (closed
loop: ``concurrency`` conversations in flight) or at an open-loop Poisson ``rate``
(conversations per second). Every request streams; per request we record TTFT, the gaps
between content chunks (ITL), TPOT = (e2e - TTFT) / (completion_tokens - 1), end-to-end
latency, token counts and ``cached_tokens`` from the final usage chunk.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

_WORDS = (
    "ferry kv block cache prefill decode replica token stream latency router tenant prompt "
    "harbour river cargo schedule batch tier expiry lease pool signal vessel quay tide"
).split()


@dataclass
class BenchConfig:
    """What load to offer."""

    # Base URL of the server, e.g. http://127.0.0.1:8000.
    url: str = "http://127.0.0.1:8000"
    # Model name to send; None asks the server's /v1/models.
    model: str | None = None
    # Conversations to run in total.
    num_conversations: int = 8
    # User turns per conversation (each turn is one request).
    turns: int = 3
    # Closed loop: conversations in flight at once (ignored when rate is set).
    concurrency: int = 4
    # Open loop: conversation arrivals per second (Poisson); None = closed loop.
    rate: float | None = None
    # Closed loop for this long instead of num_conversations: each of the `concurrency`
    # clients starts conversation after conversation until the time is up (soak tests).
    duration_s: float | None = None
    # Tokens to generate per turn.
    max_tokens: int = 16
    # Words in the shared system prompt and in each user message.
    system_words: int = 120
    user_words: int = 12
    # SLOs for goodput, seconds.
    slo_ttft_s: float = 2.0
    slo_tpot_s: float = 0.2
    # Per-request timeout, seconds.
    timeout_s: float = 120.0
    seed: int = 0


@dataclass
class RequestRecord:
    """One request's measurements."""

    ok: bool
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    text: str = ""
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.completion_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1)


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def percentiles(values: list[float], ps: tuple[int, ...] = (50, 90, 99)) -> dict[str, float]:
    """Nearest-rank percentiles plus the mean; empty input gives an empty dict."""
    if not values:
        return {}
    xs = sorted(values)
    out = {f"p{p}": xs[min(len(xs) - 1, max(0, -(-p * len(xs) // 100) - 1))] for p in ps}
    out["mean"] = sum(xs) / len(xs)
    return out


async def stream_chat(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], timeout_s: float
) -> RequestRecord:
    """POST one streaming chat completion and time its chunks."""
    t0 = time.perf_counter()
    rec = RequestRecord(ok=False)
    last: float | None = None
    parts: list[str] = []
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=timeout_s) as r:
            if r.status_code != 200:
                rec.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    u = chunk["usage"]
                    rec.prompt_tokens = u["prompt_tokens"]
                    rec.completion_tokens = u["completion_tokens"]
                    rec.cached_tokens = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                for ch in chunk.get("choices", []):
                    content = (ch.get("delta") or {}).get("content")
                    if content:
                        now = time.perf_counter()
                        if last is None:
                            rec.ttft_s = now - t0
                        else:
                            rec.itl_s.append(now - last)
                        last = now
                        parts.append(content)
        rec.e2e_s = time.perf_counter() - t0
        if last is None:  # no visible text (e.g. immediate EOS): first token time = end
            rec.ttft_s = rec.e2e_s
        rec.text = "".join(parts)
        rec.ok = True
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        rec.error = f"{type(e).__name__}: {e}"
    return rec


async def _conversation(
    client: httpx.AsyncClient, cfg: BenchConfig, model: str, system: str, rng: random.Random
) -> list[RequestRecord]:
    messages: list[dict[str, str]] = [{"role": "system", "content": system}]
    records = []
    for _ in range(cfg.turns):
        messages.append({"role": "user", "content": _words(rng, cfg.user_words)})
        body = {
            "model": model,
            "messages": messages,
            "max_tokens": cfg.max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        rec = await stream_chat(client, cfg.url, body, cfg.timeout_s)
        records.append(rec)
        if not rec.ok:
            break
        messages.append({"role": "assistant", "content": rec.text})
    return records


async def resolve_model(client: httpx.AsyncClient, url: str) -> str:
    r = await client.get(f"{url}/v1/models", timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


async def _for_duration(
    client: httpx.AsyncClient, cfg: BenchConfig, model: str, system: str, deadline: float
) -> list[list[RequestRecord]]:
    """``concurrency`` clients, each running conversations back to back until ``deadline``."""

    async def client_loop(k: int) -> list[RequestRecord]:
        records: list[RequestRecord] = []
        n = 0
        while time.perf_counter() < deadline:
            conv_rng = random.Random(cfg.seed * 1000 + k + n * cfg.concurrency)
            records += await _conversation(client, cfg, model, system, conv_rng)
            n += 1
        return records

    return list(await asyncio.gather(*(client_loop(k) for k in range(cfg.concurrency))))


async def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Offer the configured load and return the summary (see ``summarize``)."""
    rng = random.Random(cfg.seed)
    system = "You are a terse assistant. Context: " + _words(rng, cfg.system_words)
    limits = httpx.Limits(max_connections=max(cfg.concurrency, 1) * 2 + 8)
    async with httpx.AsyncClient(limits=limits) as client:
        model = cfg.model or await resolve_model(client, cfg.url)
        conv_rngs = [random.Random(cfg.seed * 1000 + i) for i in range(cfg.num_conversations)]
        t0 = time.perf_counter()
        if cfg.rate:
            async def delayed(i: int, at: float) -> list[RequestRecord]:
                await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
                return await _conversation(client, cfg, model, system, conv_rngs[i])

            at, starts = 0.0, []
            for _ in range(cfg.num_conversations):
                at += rng.expovariate(cfg.rate)
                starts.append(at)
            results = await asyncio.gather(*(delayed(i, s) for i, s in enumerate(starts)))
        elif cfg.duration_s is not None:
            results = await _for_duration(client, cfg, model, system, t0 + cfg.duration_s)
        else:
            sem = asyncio.Semaphore(cfg.concurrency)

            async def bounded(i: int) -> list[RequestRecord]:
                async with sem:
                    return await _conversation(client, cfg, model, system, conv_rngs[i])

            results = await asyncio.gather(*(bounded(i) for i in range(cfg.num_conversations)))
        wall = time.perf_counter() - t0
    records = [r for conv in results for r in conv]
    return summarize(records, wall, cfg)


def summarize(records: list[RequestRecord], wall_s: float, cfg: BenchConfig) -> dict[str, Any]:
    """Percentiles, throughput, goodput and cached-token ratio of a run."""
    ok = [r for r in records if r.ok]
    tpots = [t for r in ok if (t := r.tpot_s) is not None]
    good = [
        r for r in ok if r.ttft_s <= cfg.slo_ttft_s and (r.tpot_s is None or r.tpot_s <= cfg.slo_tpot_s)
    ]
    prompt = sum(r.prompt_tokens for r in ok)
    out_tokens = sum(r.completion_tokens for r in ok)
    return {
        "config": asdict(cfg),
        "num_requests": len(records),
        "num_ok": len(ok),
        "errors": [r.error for r in records if not r.ok][:10],
        "wall_s": wall_s,
        "ttft_s": percentiles([r.ttft_s for r in ok]),
        "tpot_s": percentiles(tpots),
        "itl_s": percentiles([x for r in ok for x in r.itl_s]),
        "e2e_s": percentiles([r.e2e_s for r in ok]),
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "output_tokens_per_s": out_tokens / wall_s if wall_s > 0 else 0.0,
        "goodput_requests_per_s": len(good) / wall_s if wall_s > 0 else 0.0,
        "slo_attainment": len(good) / len(records) if records else 0.0,
        "prompt_tokens": prompt,
        "completion_tokens": out_tokens,
        "cached_tokens": sum(r.cached_tokens for r in ok),
        "cached_token_ratio": (sum(r.cached_tokens for r in ok) / prompt) if prompt else 0.0,
    }


def format_summary(name: str, s: dict[str, Any]) -> str:
    """A compact human-readable block (milliseconds)."""

    def ms(d: dict[str, float], k: str) -> str:
        return f"{d[k] * 1000:8.1f}" if k in d else "       -"

    lines = [f"== {name}: {s['num_ok']}/{s['num_requests']} ok in {s['wall_s']:.1f}s"]
    lines.append("            p50      p90      p99     mean  (ms)")
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        d = s[key]
        lines.append(f"{key[:-2]:6s} " + " ".join(ms(d, k) for k in ("p50", "p90", "p99", "mean")))
    lines.append(
        f"throughput {s['requests_per_s']:.2f} req/s, {s['output_tokens_per_s']:.1f} tok/s; "
        f"goodput {s['goodput_requests_per_s']:.2f} req/s; cached-token ratio {s['cached_token_ratio']:.2f}"
    )
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(payload, indent=2, sort_keys=True))
