"""Drill: a rolling redeploy (``serve.run`` with a changed config) while clients stream.

Serve starts the new version's replicas, moves traffic to them and stops the old ones; an
old replica stops taking requests and finishes the ones it has (its graceful-shutdown
timeout is ``http.request_timeout_s``). Streams are started continuously across the whole
redeploy, so some are in flight on old replicas as they stop: every one must finish
token-exact with no error event, and every short request sent meanwhile must get a 200.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.cluster.conftest import deploy_app
from tests.cluster.streaming import ChatStream, chat_body

pytestmark = [pytest.mark.ray, pytest.mark.slow]

APP = "kvferry-redeploy"
CONTENT = "a long story about the ferry and the river, please"
TOKENS = 400


def test_rolling_redeploy_drops_no_in_flight_request(ray_cluster, tiny_model: Path, reference_engine) -> None:
    from ray import serve

    from cluster.app import build_app
    from engine import SamplingParams

    ids = reference_engine.encode_chat([{"role": "user", "content": CONTENT}])
    expected = reference_engine.generate([ids], SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True))[0].text
    settings = {"model": {"model": str(tiny_model)}, "engine": {"num_kv_blocks": 256, "block_size": 16}}
    with deploy_app(APP, settings) as (url, cfg):
        before = httpx.post(url + "/v1/chat/completions", json=chat_body("hi", 2), timeout=60)
        assert before.status_code == 200
        old_replica = before.headers["x-kvferry-decode-replica"]
        done = threading.Event()
        streams: list[ChatStream] = []
        probes: list[int] = []

        def keep_streaming() -> None:  # 4 streams in flight at every moment
            while not done.is_set():
                if sum(s.is_alive() for s in streams) < 4:
                    s = ChatStream(url, CONTENT, TOKENS)
                    s.start()
                    streams.append(s)
                time.sleep(0.1)

        def keep_probing() -> None:
            while not done.is_set():
                probes.append(httpx.post(url + "/v1/chat/completions", json=chat_body("ping", 2), timeout=60)
                              .status_code)
                time.sleep(0.5)

        load = threading.Thread(target=keep_streaming, daemon=True)
        probe = threading.Thread(target=keep_probing, daemon=True)
        load.start()
        probe.start()
        time.sleep(1.0)
        new_cfg = cfg.with_overrides({"engine.default_ttl_s": cfg.engine.default_ttl_s + 1})  # a new version
        t0 = time.monotonic()
        serve.run(build_app(new_cfg), name=APP, route_prefix="/")  # returns once the new version runs
        redeploy_s = time.monotonic() - t0
        time.sleep(3.0)  # old replicas drain while new streams go to the new ones
        done.set()
        load.join(60)
        probe.join(60)
        for s in streams:
            s.join(120)
        after = httpx.post(url + "/v1/chat/completions", json=chat_body("hi", 2), timeout=60)
        assert after.status_code == 200
        assert after.headers["x-kvferry-decode-replica"] != old_replica, "the redeploy replaced nothing"
        broken = [(s.status, s.errors, len(s.text)) for s in streams if s.errors or s.text != expected]
        on_old = sum(s.replica == old_replica for s in streams)
        assert not broken, f"{len(broken)} of {len(streams)} streams broke: {broken[:3]}"
        assert set(probes) == {200}, probes
        assert on_old >= 1, "no stream was in flight on the old version: the drill proved nothing"
        print(f"[measured] rolling redeploy ({redeploy_s:.1f}s): {len(streams)} streams of {TOKENS} tokens "
              f"({on_old} on the old decode replica) all finished token-exact; {len(probes)} short requests "
              f"meanwhile, all 200")
