"""The KV transfer board: the blocks ferried from the prefill pool to the decode pool.

Everything is counted by the receiving (decode) replica, per transport backend (gloo, nccl,
cuda_ipc): how many bytes and transfers per second, how long a remote prefill takes end to
end, how many fail, and how many prompts were prefilled locally instead and why. A failed
transfer costs the client latency, not an error, so this board is where failures show.
"""

from __future__ import annotations

from cluster.observability.dashboards.exprs import quantile, rate_sum, serve_sel, share
from cluster.observability.dashboards.spec import Board, Panel, Row, Target, describe

UID = "kvferry-kv-transfer"
BACKEND = "backend"
_BYTES, _TRANSFERS = "kvferry_kv_transfer_bytes_total", "kvferry_remote_prefills_total"
_SECONDS, _FAILURES = "kvferry_kv_transfer_seconds", "kvferry_kv_transfer_failures_total"
_RECOMPUTES = "kvferry_local_recomputes_total"


def _volume() -> tuple[Panel, ...]:
    transfers = rate_sum(_TRANSFERS, serve_sel(), BACKEND)
    nbytes = rate_sum(_BYTES, serve_sel(), BACKEND)
    return (
        Panel("Bytes/s by backend", describe(_BYTES) + " Per second.", "Bps",
              (Target(nbytes, "{{backend}}", pool_label=None),)),
        Panel("Transfers/s by backend", describe(_TRANSFERS) + " Each one landed its KV here.", "reqps",
              (Target(transfers, "{{backend}}", pool_label=None),)),
        Panel("Mean bytes per transfer", "KV bytes over remote prefills: the share of a prompt the "
              "decode replica did not hold already.", "bytes",
              (Target(f"{nbytes} / {transfers}", "{{backend}}", pool_label=None),)),
        Panel("Transfer latency p50 / p99", describe(_SECONDS), "s",
              (Target(quantile(0.5, _SECONDS, serve_sel(), BACKEND), "{{backend}} p50", pool_label=None),
               Target(quantile(0.99, _SECONDS, serve_sel(), BACKEND), "{{backend}} p99", pool_label=None))),
    )


def _failures() -> tuple[Panel, ...]:
    failures = rate_sum(_FAILURES, serve_sel(), BACKEND)
    transfers = rate_sum(_TRANSFERS, serve_sel(), BACKEND)
    return (
        Panel("Transfer failures/s by backend", describe(_FAILURES), "ops",
              (Target(failures, "{{backend}}", pool_label=None, requires="transfer_failure"),), width=8),
        Panel("Transfer failure ratio", "Failed transfers over all attempted ones, per backend "
              "(the alert fires above 1 %).", "percentunit",
              (Target(share(failures, transfers), "{{backend}}", pool_label=None),), max=1.0, width=8),
        Panel("Local recomputes/s by reason", describe(_RECOMPUTES) + " transfer_failed: the KV did not "
              "arrive; pool_unavailable: no prefill replica answered.", "ops",
              (Target(rate_sum(_RECOMPUTES, serve_sel(), "deployment", "reason"), "{{deployment}} {{reason}}",
                      requires="transfer_failure"),), stack=True, width=8),
    )


BOARD = Board(
    uid=UID,
    title="kvferry / KV transfer",
    description="KV blocks ferried from the prefill pool to the decode pool, by transport backend: "
                "bytes/s, transfers/s, latency, failures and local recomputes.",
    rows=(
        Row("Volume and latency", _volume()),
        Row("Failures and fallbacks", _failures()),
    ),
)
