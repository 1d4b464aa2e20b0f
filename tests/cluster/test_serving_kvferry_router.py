"""kvferry's cache-affinity routers wired into the app: conversations stick to their replica.

Two decode replicas and one prefill replica with ``request_router: kvferry``: the ingress
tokenizes and hashes, replicas flush KV events to the directory and report load; a growing
conversation must keep landing on the decode replica that holds its prefix.
"""

from __future__ import annotations


import pytest

from tests.cluster.conftest import deploy_app

pytestmark = [pytest.mark.ray, pytest.mark.slow]

APP = "kvferry-routed"


@pytest.fixture(scope="module")
def routed_server(ray_cluster, tiny_model):
    settings = {
        "routing": {"request_router": "kvferry"},
        "model": {"model": str(tiny_model)},
        "engine": {"num_kv_blocks": 256, "local_prefill_threshold": 8},
        "decode": {"num_replicas": 2, "num_cpus": 0.5},
    }
    with deploy_app(APP, settings) as (url, _):
        yield url


def test_conversation_sticks_to_the_replica_holding_its_prefix(routed_server: str) -> None:
    import time

    from openai import OpenAI

    client = OpenAI(base_url=routed_server + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    messages = [{"role": "system", "content": "You keep a ferry log. " * 6}]
    decode_replicas, cached = [], []
    for turn in range(4):
        messages.append({"role": "user", "content": f"turn {turn}: what crossed the river?"})
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=messages, max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
        )
        resp = raw.parse()
        decode_replicas.append(raw.headers["x-kvferry-decode-replica"])
        cached.append(resp.usage.prompt_tokens_details.cached_tokens)
        messages.append({"role": "assistant", "content": resp.choices[0].message.content})
        time.sleep(0.3)  # let the replica's KV events reach the directory
    # Every later turn returns to the first turn's replica and reuses its cached prefix.
    assert len(set(decode_replicas)) == 1, decode_replicas
    assert all(c > 0 for c in cached[1:]), cached
    # The decode pool's directory holds the conversation's blocks on that replica, unexpired
    # after a sweep: replicas stamp expiry with the directory's wall clock.
    import ray

    from router.directory_actor import get_or_create_directory

    time.sleep(1.5)  # at least one sweep of the directory's 1 s loop
    directory = get_or_create_directory("decode")
    snaps = {s.replica_id: s for s in ray.get(directory.snapshot.remote())}
    assert decode_replicas[0] in snaps, sorted(snaps)
    now = time.time()
    blocks = snaps[decode_replicas[0]].blocks
    assert blocks and all(now < expires_at <= now + 301 for _, _, _, expires_at in blocks)


def _turn(client, model: str, messages: list[dict]) -> tuple[str, int]:
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
    )
    resp = raw.parse()
    messages.append({"role": "assistant", "content": resp.choices[0].message.content})
    return raw.headers["x-kvferry-decode-replica"], resp.usage.prompt_tokens_details.cached_tokens


def test_directory_actor_killed_routing_falls_back_then_rebuilds(routed_server: str) -> None:
    """Drill: kill the decode pool's KV directory. Requests keep succeeding (power of two while
    it is away), Ray restarts it empty, the replicas' next flushes see the gap and send
    snapshots, and the conversation is routed back to the replica holding its prefix."""
    import time

    import ray
    from openai import OpenAI

    from router.directory_actor import get_or_create_directory

    client = OpenAI(base_url=routed_server + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    convo = [{"role": "system", "content": "You keep the directory's ledger. " * 6}]
    convo.append({"role": "user", "content": "first entry?"})
    home, _ = _turn(client, model, convo)
    time.sleep(0.5)  # its KV events reach the directory

    ray.kill(get_or_create_directory("decode"), no_restart=False)
    t_kill = time.monotonic()
    others = 0
    for i in range(6):  # during and after the restart: none may fail
        other = [{"role": "user", "content": f"stranger {i} asks about the weather " * 3}]
        _turn(client, model, other)
        others += 1
    # Rebuilt: the restarted directory knows the conversation's home replica again.
    directory = get_or_create_directory("decode")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            snaps = {s.replica_id: s for s in ray.get(directory.snapshot.remote(), timeout=10)}
        except ray.exceptions.ActorUnavailableError:  # still restarting
            snaps = {}
        if home in snaps and snaps[home].blocks:
            break
        _turn(client, model, [{"role": "user", "content": "nudge a flush"}])
        time.sleep(0.5)
    else:
        raise AssertionError("the directory was not rebuilt from the replicas' snapshots in 30 s")
    rebuilt_s = time.monotonic() - t_kill
    turns = []
    for turn in range(3):  # routing quality returns: back to the home replica, prefix cached
        convo.append({"role": "user", "content": f"entry {turn}?"})
        turns.append(_turn(client, model, convo))
        time.sleep(0.3)
    assert all(r == home for r, _ in turns), (home, turns)
    assert all(c > 0 for _, c in turns), turns
    print(f"[measured] directory killed: {others} requests served meanwhile, 0 failed; rebuilt from "
          f"snapshots {rebuilt_s:.1f} s after the kill; the conversation returned to its replica")
