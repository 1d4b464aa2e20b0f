"""Per-pool autoscaling on a real local Ray cluster: the decode pool grows under load and
shrinks when the load goes away, while the prefill pool keeps its fixed size.

The targets are tiny (one ongoing request per decode replica, sub-second delays) so the
whole cycle fits in well under a minute on a 2-core box; production defaults are in
``cluster.config.AutoscalingConfig``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from tests.cluster.conftest import deploy_app

pytestmark = [pytest.mark.ray, pytest.mark.slow]

APP = "kvferry-autoscale"


def _running_replicas(deployment: str) -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or deployment not in app.deployments:
        return 0
    return int(app.deployments[deployment].replica_states.get("RUNNING", 0))


async def _stream(client: httpx.AsyncClient, url: str, i: int) -> None:
    body = {"model": "llama", "prompt": f"load {i} " * 4, "max_tokens": 200, "temperature": 0,
            "ignore_eos": True, "stream": True}
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for _ in r.aiter_lines():
            pass


async def _load_until(url: str, done, concurrency: int, timeout_s: float) -> None:
    """Keep ``concurrency`` streams in flight until ``done()`` or the timeout."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=120) as client:
        i = 0
        tasks: set[asyncio.Task] = set()
        while not done() and time.monotonic() < deadline:
            while len(tasks) < concurrency:
                i += 1
                tasks.add(asyncio.create_task(_stream(client, url, i)))
            finished, tasks = await asyncio.wait(tasks, timeout=0.5)
            for t in finished:
                t.result()  # a failed request fails the test
        for t in tasks:
            await t


def test_decode_pool_scales_up_under_load_then_down(ray_cluster, tiny_model: Path) -> None:
    settings = {
        "model": {"model": str(tiny_model)},
        "engine": {"num_kv_blocks": 256, "block_size": 16},
        "decode": {"num_replicas": "auto", "autoscaling": {
            "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
            "upscale_delay_s": 0.5, "downscale_delay_s": 2.0,
            "metrics_interval_s": 0.5, "look_back_period_s": 1.0,
        }},
    }
    with deploy_app(APP, settings) as (url, _cfg):
        assert _running_replicas("decode") == 1
        asyncio.run(_load_until(url, lambda: _running_replicas("decode") >= 2, concurrency=4, timeout_s=90))
        assert _running_replicas("decode") == 2, "decode pool did not scale up under load"
        assert _running_replicas("prefill") == 1, "the prefill pool must not follow the decode pool"
        deadline = time.monotonic() + 90
        while _running_replicas("decode") > 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _running_replicas("decode") == 1, "decode pool did not scale back down when idle"
        # Still serving after the scale-down.
        r = httpx.post(url + "/v1/completions", json={"model": "llama", "prompt": "after", "max_tokens": 4},
                       timeout=60)
        assert r.status_code == 200, r.text
