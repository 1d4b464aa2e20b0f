"""Replay simulator: service model, cache accounting, policy ordering, CLI output."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from router.replay import (
    PoolSimulator,
    ReplayConfig,
    ServiceModel,
    TraceRequest,
    load_trace,
    replay,
    tier_comparison,
)
from router.replay_cli import main as _main  # noqa: F401 - the module entry point imports
from router.replay_cli import replay_command


def _trace(n: int = 300, seed: int = 0) -> list[TraceRequest]:
    """Sessions sharing 8-block prefixes, Poisson-ish arrivals, ~3 replicas' worth of load."""
    rng = random.Random(seed)
    prefixes = [tuple(range(1000 * i, 1000 * i + 8)) for i in range(12)]
    out, t, nxt = [], 0.0, 10**6
    for _ in range(n):
        t += rng.expovariate(4.0)
        suffix = tuple(range(nxt, nxt + 2))
        nxt += 2
        ids = prefixes[rng.randrange(len(prefixes))] + suffix
        out.append(TraceRequest(t, len(ids) * 512 - 100, 10, ids))
    return out


def test_single_request_service_time_and_second_hit():
    cfg = ReplayConfig(num_replicas=1, cache_tokens=10 * 512, service=ServiceModel(1000.0, 0.5))
    sim = PoolSimulator("kvferry", cfg)
    a = TraceRequest(0.0, 1024, 1, (1, 2))
    b = TraceRequest(10.0, 1536, 1, (1, 2, 3))
    res = sim.run([a, b])
    # a: 0.5 + 1024/1000; b: 1024 cached, 512 computed.
    assert res.ttft_mean_s == pytest.approx(((0.5 + 1.024) + (0.5 + 0.512)) / 2)
    assert res.hit_rate == pytest.approx(1024 / (1024 + 1536))


def test_queueing_is_fifo_per_replica():
    cfg = ReplayConfig(num_replicas=1, cache_tokens=0, service=ServiceModel(1000.0, 0.0))
    res = PoolSimulator("round_robin", cfg).run([TraceRequest(0.0, 1000, 1, (1, 2)), TraceRequest(0.0, 1000, 1, (3, 4))])
    assert res.ttft_p99_s == pytest.approx(2.0) and res.ttft_p50_s == pytest.approx(1.0)


def test_lru_capacity_limits_hits():
    cfg = ReplayConfig(num_replicas=1, cache_tokens=2 * 512, service=ServiceModel(1e6, 0.0))
    res = PoolSimulator("kvferry", cfg).run([
        TraceRequest(0.0, 512 * 2, 1, (1, 2)), TraceRequest(1.0, 512 * 2, 1, (3, 4)),
        TraceRequest(2.0, 512 * 2, 1, (1, 2))])
    assert res.hit_rate == 0.0  # (1, 2) was evicted by (3, 4)


def test_a_host_hit_costs_its_promote_time_and_outlives_the_device():
    svc = ServiceModel(1000.0, 0.5, (0.0, 1e-4, 1e-3))
    a, b = TraceRequest(0.0, 1024, 1, (1, 2)), TraceRequest(10.0, 1024, 1, (3, 4))
    again = TraceRequest(20.0, 1024, 1, (1, 2))
    cfg = ReplayConfig(num_replicas=1, cache_tokens=2 * 512, host_tokens=4 * 512, service=svc)
    res = PoolSimulator("kvferry", cfg).run([a, b, again])
    # b pushed (1, 2) to host; `again` promotes 1023 tokens (the last is computed).
    assert res.hit_rate_host == pytest.approx(1023 / 3072) and res.hit_rate_device == 0.0
    assert res.ttft_mean_s == pytest.approx((2 * (0.5 + 1.024) + 0.5 + 0.001 + 1023 * 1e-4) / 3)
    assert PoolSimulator("kvferry", replace(cfg, host_tokens=0)).run([a, b, again]).hit_rate == 0.0
    # Past the device TTL (5 s) the blocks live on in host memory for the host TTL (60 s).
    ttl = replace(cfg, cache_tokens=8 * 512, ttl_s=5.0, host_ttl_s=60.0)
    late = TraceRequest(40.0, 1024, 1, (1, 2))
    res = PoolSimulator("kvferry", ttl).run([a, late])
    assert res.hit_rate_host == pytest.approx(1023 / 2048)
    assert PoolSimulator("kvferry", replace(ttl, host_tokens=0)).run([a, late]).hit_rate == 0.0
    assert PoolSimulator("kvferry", ttl).run([a, TraceRequest(100.0, 1024, 1, (1, 2))]).hit_rate == 0.0


def test_host_tier_pays_off_only_when_routing_sees_it():
    """Working set 4x the device tier: a host tier lifts the hit rate a little with a
    device-only router view, and a lot when the router credits host hits."""
    rng = random.Random(0)
    prefixes = [tuple(range(1000 * i, 1000 * i + 8)) for i in range(24)]
    trace, t = [], 0.0
    for i in range(300):
        t += rng.expovariate(2.0)
        ids = prefixes[rng.randrange(len(prefixes))] + (10**6 + 2 * i, 10**6 + 2 * i + 1)
        trace.append(TraceRequest(t, len(ids) * 512 - 100, 10, ids))
    # A short speculative TTL: affinity must come from the directory, not the router's memory.
    cfg = ReplayConfig(num_replicas=4, cache_tokens=16 * 512, host_tokens=64 * 512, speculative_ttl_s=1.0,
                       service=ServiceModel(12_000.0, 0.02))
    device, blind, aware = tier_comparison(trace, cfg)
    assert device.hit_rate_host == 0.0 and (device.host_tokens, blind.tier_events) == (0, False)
    assert aware.hit_rate > blind.hit_rate + 0.2 and blind.hit_rate > device.hit_rate
    assert aware.hit_rate_host > 0.3
    assert aware.ttft_mean_s < 0.75 * blind.ttft_mean_s and blind.ttft_mean_s < device.ttft_mean_s
    total = aware.hit_rate_device + aware.hit_rate_host + aware.hit_rate_disk
    assert total == pytest.approx(aware.hit_rate)


def test_cache_aware_policies_beat_round_robin_on_shared_prefixes():
    trace = _trace()
    cfg = ReplayConfig(num_replicas=4, cache_tokens=40 * 512, service=ServiceModel(12_000.0, 0.02))
    res = {r.policy: r for r in replay(trace, ["round_robin", "least_loaded", "cache_aware", "kvferry"], cfg)}
    assert res["kvferry"].hit_rate > res["round_robin"].hit_rate + 0.2
    assert res["kvferry"].ttft_mean_s < res["round_robin"].ttft_mean_s
    assert res["kvferry"].ttft_mean_s < res["least_loaded"].ttft_mean_s
    assert all(r.imbalance >= 1.0 for r in res.values())


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError):
        PoolSimulator("random", ReplayConfig())


def test_load_trace_reports_bad_lines(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"timestamp": 5, "input_length": 10, "output_length": 1, "hash_ids": [1]}\n{"oops": 1}\n')
    with pytest.raises(ValueError, match=":2:"):
        load_trace(p)


def test_cli_json_has_the_documented_keys(tmp_path):
    import typer

    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps({"timestamp": int(r.arrival_s * 1000), "input_length": r.input_length,
                                       "output_length": 1, "hash_ids": list(r.hash_ids)}) for r in _trace(60)))
    app = typer.Typer()
    app.command()(replay_command)
    out = CliRunner().invoke(app, [str(p), "--replicas", "2", "--policies", "round_robin,kvferry", "--json", "--ttl-sweep"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert [r["policy"] for r in rows[:2]] == ["round_robin", "kvferry"]
    assert len(rows) > 2 and all(r["ttl_s"] is not None for r in rows[2:])
    for key in ("policy", "hit_rate", "hit_rate_device", "hit_rate_host", "hit_rate_disk", "ttft_mean_s",
                "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "imbalance"):
        assert key in rows[0]
    # With a lower tier: the policies, then kvferry device-only / tier-blind / tier-aware.
    out = CliRunner().invoke(app, [str(p), "--replicas", "2", "--cache-tokens", "4096", "--host-tokens", "16384",
                                   "--disk-tokens", "65536", "--host-ttl", "600", "--host-promote-us-per-token", "8",
                                   "--policies", "kvferry", "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert [(r["host_tokens"], r["disk_tokens"], r["tier_events"]) for r in rows] == [
        (16384, 65536, True), (0, 0, True), (16384, 65536, False), (16384, 65536, True)]
    assert rows[0] == rows[3]
    table = CliRunner().invoke(app, [str(p), "--replicas", "2", "--cache-tokens", "4096", "--host-tokens", "16384",
                                     "--policies", "kvferry"])
    assert table.exit_code == 0 and "vs device only" in table.output and "dev/host/disk" in table.output
    bad = CliRunner().invoke(app, [str(p), "--policies", "nope"])
    assert bad.exit_code != 0 and "nope" in bad.output
