"""Choose how a loaded model's linears run on this CPU (``EngineConfig.cpu_linear``), and say why.

``"dense"`` keeps ``F.linear`` on HF's layout. ``"onednn"`` packs every linear for oneDNN
(an error where this torch cannot). ``"auto"`` times every runnable candidate on the
model's own shapes (``engine.models.cpu_linear.time_shape``), picks per shape and logs the
choice with its timings; it falls back to the dense kernels when oneDNN is absent. CUDA
models are left alone: cuBLAS takes HF's layout as it is.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import torch

from engine.models.cpu_linear import (
    DECODE_BATCH,
    KERNELS,
    PREFILL_TOKENS,
    LinearKernel,
    ShapeTiming,
    onednn_unavailable_reason,
    pick,
    time_shape,
)
from engine.models.decoder import DecoderForCausalLM
from engine.models.layers import Linear

logger = logging.getLogger(__name__)

CpuLinear = Literal["auto", "onednn", "dense"]

# Seconds of timing after which the shapes left take the kernel that won most (a quiet
# 2-core box times the default model's five shapes in about a second).
CALIBRATION_BUDGET_S = 3.0


@dataclass
class LinearPlan:
    """What ``setup_cpu_linears`` did: kernels in use, per-shape timings, time it took."""

    setting: str
    kernels: dict[str, int] = field(default_factory=dict)  # kernel -> number of linears
    shapes: list[ShapeTiming] = field(default_factory=list)
    seconds: float = 0.0
    note: str = ""
    # Shapes (in, out) left untimed because the timing ran over CALIBRATION_BUDGET_S.
    untimed: list[tuple[int, int]] = field(default_factory=list)

    def summary(self) -> str:
        used = ", ".join(f"{n} {k}" for k, n in sorted(self.kernels.items()))
        notes = [self.note] if self.note else []
        if self.untimed:
            notes.append(f"over the {CALIBRATION_BUDGET_S:g} s budget, untimed shapes {self.untimed} "
                         "took the kernel that won most")
        extra = "".join(f"; {n}" for n in notes)
        return f"cpu_linear={self.setting}: {used} linears ({self.seconds:.2f} s){extra}"


def calibration_batch_sizes(max_num_seqs: int, max_num_batched_tokens: int, head: bool) -> list[int]:
    """M values timed: batch 1, a mid decode batch and (not for the lm_head) a prefill chunk."""
    sizes = {1, min(DECODE_BATCH, max_num_seqs)}
    if not head:
        sizes.add(min(PREFILL_TOKENS, max_num_batched_tokens))
    return sorted(sizes)


@torch.inference_mode()
def setup_cpu_linears(
    model: DecoderForCausalLM,
    setting: CpuLinear,
    device: torch.device,
    max_num_seqs: int = DECODE_BATCH,
    max_num_batched_tokens: int = PREFILL_TOKENS,
) -> LinearPlan:
    """Apply ``setting`` to ``model``'s linears (all in the ``dense`` state, as loaded)."""
    t0 = time.perf_counter()
    linears = model.linears()
    plan = LinearPlan(setting)
    if device.type != "cpu" or setting == "dense":
        plan.kernels = {"dense": len(linears)}
        return plan
    reason = onednn_unavailable_reason(model.lm_head.out_weight().dtype)
    if setting == "onednn":
        if reason is not None:
            raise ValueError(f"cpu_linear='onednn' cannot run: {reason}; use 'auto' or 'dense'")
        model.use_linear_kernels(dict.fromkeys(linears, "onednn"))
    else:
        _calibrate(model, linears, reason, max_num_seqs, max_num_batched_tokens, plan)
    plan.kernels = dict(Counter(m.kernel for m in linears))
    plan.seconds = time.perf_counter() - t0
    logger.info("%s", plan.summary())
    for shape in plan.shapes:
        logger.info("cpu_linear %s", shape.describe())
    return plan


def _calibrate(
    model: DecoderForCausalLM,
    linears: list[Linear],
    onednn_missing: str | None,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    plan: LinearPlan,
) -> None:
    kinds = [k for k in KERNELS if k != "onednn" or onednn_missing is None]
    if onednn_missing is not None:
        plan.note = f"oneDNN not used: {onednn_missing}"
    groups: dict[tuple[int, int, bool], list[Linear]] = {}
    for m in linears:
        groups.setdefault((m.in_features, m.out_features, m is model.lm_head), []).append(m)
    packed: dict[int, torch.Tensor] = {}  # oneDNN copies made while timing, reused if chosen
    choice: dict[Linear, LinearKernel] = {}
    wins: Counter[LinearKernel] = Counter()
    t0 = time.perf_counter()
    # Largest shapes first: they matter most if the budget cuts the timing short.
    for (in_f, out_f, head), mods in sorted(groups.items(), key=lambda g: -g[0][0] * g[0][1] * len(g[1])):
        if time.perf_counter() - t0 > CALIBRATION_BUDGET_S and wins:
            # A loaded machine makes every pass slow: finish with the kernel that won most.
            kind = wins.most_common(1)[0][0]
            choice.update(dict.fromkeys(mods, kind))
            plan.untimed.append((in_f, out_f))
            continue
        sizes = calibration_batch_sizes(max_num_seqs, max_num_batched_tokens, head)
        ms = time_shape([m.out_weight() for m in mods], [m.bias for m in mods], kinds, sizes, packed)
        timing = ShapeTiming(in_f, out_f, len(mods), ms, pick(ms))
        plan.shapes.append(timing)
        wins[timing.choice] += len(mods)
        choice.update(dict.fromkeys(mods, timing.choice))
    model.use_linear_kernels(choice, packed)
