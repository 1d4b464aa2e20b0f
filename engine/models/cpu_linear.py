"""CPU matmul kernels for ``Linear``, chosen per machine at load by timing the model's shapes.

Three ways to compute ``x W^T + b`` on a CPU, each keeping exactly one copy of ``W``:

- ``onednn``: ``W`` reordered once into oneDNN's blocked layout
  (``torch.ops.mkldnn._reorder_linear_weight``, no batch-size hint so any M runs on it) and
  multiplied with ``torch.ops.mkldnn._linear_pointwise``. vLLM's CPU backend does the same
  for fp32 (``onednn_mm``), and inductor for dynamic-batch linears.
- ``dense``: ``F.linear`` on HF's ``(out, in)`` weight (MKL sgemm): the fallback.
- ``dense_t``: ``x @ W`` with ``W`` stored ``(in, out)``, which MKL ran up to 2x faster at
  decode-sized M on the Intel Xeon this engine was first tuned on.

Which one is fastest depends on the CPU (an AVX2 AMD EPYC runs the lm_head ~3x faster on
oneDNN at M=16 than MKL; on other parts the gap differs or reverses) and on M, so it is
never guessed from the vendor: ``calibrate`` times every candidate on the real shapes, at
a decode batch of 1, a mid-size decode batch and (except for the lm_head, which only sees
sampled rows) a prefill chunk, and picks per shape. Each timed pass walks enough layers'
weights (``STREAM_BYTES``) that they come from memory as in a real step, not from cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

LinearKernel = Literal["onednn", "dense", "dense_t"]
KERNELS: tuple[LinearKernel, ...] = ("onednn", "dense", "dense_t")

# Bytes of weights one timed pass streams: more than a server CPU's last-level cache, so a
# pass measures memory-bound decode matmuls the way a step sees them.
STREAM_BYTES = 48 << 20
# Timed passes per candidate and batch size (after one warm-up); the fastest one counts.
REPEATS = 2
# Decode batch sizes timed besides 1 (capped by max_num_seqs), and the prefill chunk cap.
DECODE_BATCH = 16
PREFILL_TOKENS = 256


def onednn_unavailable_reason(dtype: torch.dtype) -> str | None:
    """None when this torch can run prepacked oneDNN linears in ``dtype``; else why not.

    Probed by running the two ops on a small matrix: the ops exist only in builds with
    mkldnn (not on every torch, never for CUDA tensors), and a dtype may lack a kernel.
    """
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    try:
        reorder = torch.ops.mkldnn._reorder_linear_weight
        linear = torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError) as e:
        return f"torch.ops.mkldnn lacks the prepacked linear ops ({e})"
    try:
        w = torch.randn(24, 40).to(dtype)
        x = torch.randn(3, 40).to(dtype)
        b = torch.randn(24).to(dtype)
        y = linear(x, reorder(w), b, "none", [], "")
        ok = torch.allclose(y.float(), F.linear(x, w, b).float(), rtol=2e-2, atol=2e-2)
    except RuntimeError as e:
        return f"the oneDNN linear does not run in {dtype} here ({e})"
    return None if ok else f"the oneDNN linear gives wrong results in {dtype} here"


def pack_onednn(weight: torch.Tensor) -> torch.Tensor:
    """``(out, in)`` weight -> oneDNN's opaque blocked copy, for any batch size."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + b`` with ``W`` packed by :func:`pack_onednn`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def run_kernel(kind: LinearKernel, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + b`` where ``w`` is ``kind``'s storage of ``W`` (packed, (out, in) or (in, out))."""
    if kind == "onednn":
        return onednn_linear(x, w, bias)
    if kind == "dense_t":
        return torch.mm(x, w) if bias is None else torch.addmm(bias, x, w)
    return F.linear(x, w, bias)


@dataclass
class ShapeTiming:
    """Calibration of one linear shape: ms per call for each candidate at each M."""

    in_features: int
    out_features: int
    num_modules: int
    ms: dict[LinearKernel, dict[int, float]] = field(default_factory=dict)
    choice: LinearKernel = "dense"

    def describe(self) -> str:
        per_m = "; ".join(
            f"M={m}: " + ", ".join(f"{k} {self.ms[k][m]:.3f}" for k in self.ms)
            for m in next(iter(self.ms.values()), {})
        )
        return f"{self.in_features}->{self.out_features} x{self.num_modules}: {self.choice} ({per_m} ms)"


def _storage(kind: LinearKernel, weight: torch.Tensor, packed: dict[int, torch.Tensor]) -> torch.Tensor:
    if kind == "onednn":
        key = id(weight)
        if key not in packed:
            packed[key] = pack_onednn(weight)
        return packed[key]
    return weight.t().contiguous() if kind == "dense_t" else weight


def _time_pass(kind: LinearKernel, x: torch.Tensor, ws: Sequence[torch.Tensor], bs: Sequence[torch.Tensor | None]) -> float:
    t = time.perf_counter()
    for w, b in zip(ws, bs):
        run_kernel(kind, x, w, b)
    return (time.perf_counter() - t) / len(ws)


def time_shape(
    weights: Sequence[torch.Tensor],  # (out, in) each, HF layout
    biases: Sequence[torch.Tensor | None],
    kinds: Sequence[LinearKernel],
    batch_sizes: Iterable[int],
    packed: dict[int, torch.Tensor],
) -> dict[LinearKernel, dict[int, float]]:
    """ms per call of each kind at each M; candidates interleaved so load swings hit all alike.

    ``packed`` collects the oneDNN copies made on the way (keyed by ``id`` of the weight),
    so the ones kept need not be packed twice.
    """
    out_f, in_f = weights[0].shape
    per_row = in_f * weights[0].element_size()
    n = max(1, min(len(weights), -(-STREAM_BYTES // (per_row * out_f))))
    weights, biases = list(weights[:n]), list(biases[:n])
    scale = 1.0
    if n == 1 and out_f * per_row > STREAM_BYTES:
        # One matrix larger than a pass (an lm_head): time its first rows and scale up.
        rows = max(1, STREAM_BYTES // per_row)
        scale = out_f / rows
        weights = [weights[0][:rows]]
        biases = [None if biases[0] is None else biases[0][:rows]]
        packed = {}  # a slice's packed copy is of no use later
    ms: dict[LinearKernel, dict[int, float]] = {k: {} for k in kinds}
    store = {k: [_storage(k, w, packed) for w in weights] for k in kinds}
    for m in batch_sizes:
        # A prefill-sized M is compute-bound: one module shows its speed, cache or not.
        count = n if m <= DECODE_BATCH * 4 else 1
        x = torch.randn(m, in_f, dtype=weights[0].dtype)
        best = {k: float("inf") for k in kinds}
        for rep in range(REPEATS + 1):
            for k in kinds:
                dt = _time_pass(k, x, store[k][:count], biases[:count])
                if rep:  # the first round warms caches and oneDNN's primitive cache
                    best[k] = min(best[k], dt)
        for k in kinds:
            ms[k][m] = best[k] * 1e3 * scale
    return ms


def pick(ms: dict[LinearKernel, dict[int, float]]) -> LinearKernel:
    """The candidate with the smallest sum over M of (its time / the best time at that M).

    Relative, so a prefill-sized M (tens of ms) does not drown the decode sizes that a
    step runs many times more often.
    """
    ms_any = next(iter(ms.values()))
    best = {m: min(ms[k][m] for k in ms) for m in ms_any}
    return min(ms, key=lambda k: sum(ms[k][m] / max(best[m], 1e-9) for m in ms_any))
