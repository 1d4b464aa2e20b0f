"""Turns logits into tokens: greedy, temperature, top-k, top-p, logit bias, reproducible seeds.

A seeded request draws its ``i``-th token from a generator seeded by ``(seed, i)``,
so the same request yields the same tokens whichever replica samples which token
(prefill replica samples the first, decode replica the rest) and whatever else shares
the batch.

Numerical safety: every value ``SamplingParams`` accepts must sample without error.
Rows are filtered in float64, so a tiny ``top_p`` (1e-300, subnormals) is a real
threshold rather than 0 after a float32 cast; the most likely token always survives the
nucleus cut; temperatures below ``GREEDY_TEMPERATURE`` are greedy (dividing by 5e-324
overflows). A row that still cannot be sampled (the model produced NaN logits) comes back
as a :class:`SamplingFailure` for that request alone: one request never fails the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, i) over 64 bits


def token_seed(seed: int, index: int) -> int:
    """Deterministic per-token seed from a request seed and the token's output index."""
    return ((seed * _SEED_MIX) ^ (index + 1) * 0xBF58476D1CE4E5B9) & ((1 << 63) - 1)


@dataclass(frozen=True)
class SamplingFailure:
    """One row could not be sampled; the engine fails that request with ``message``."""

    message: str


class Sampler:
    """Samples one token per row of a logits matrix."""

    def __init__(self, seed: int = 0) -> None:
        # Unseeded requests share this generator (their draws depend on batch order).
        self._rng = torch.Generator().manual_seed(seed)

    def sample(
        self,
        logits: torch.Tensor,  # (N, V) float32
        params: Sequence[SamplingParams],
        output_indices: Sequence[int],  # index of the token being sampled in each request's output
    ) -> list[int | SamplingFailure]:
        """One token (or a failure) per row, in row order."""
        if logits.shape[0] != len(params):
            raise ValueError(f"{logits.shape[0]} logit rows for {len(params)} requests")
        plain = [p.greedy and not p.logit_bias for p in params]
        # One batched argmax serves every plain-greedy row; skipped when no row is one.
        greedy_ids = logits.argmax(dim=-1).tolist() if any(plain) else []
        if all(plain):
            return greedy_ids
        out: list[int | SamplingFailure] = []
        for row, (p, idx) in enumerate(zip(params, output_indices)):
            out.append(greedy_ids[row] if plain[row] else self._sample_row(logits[row], p, idx))
        return out

    def _sample_row(self, logits: torch.Tensor, p: SamplingParams, index: int) -> int | SamplingFailure:
        x = logits.detach().to("cpu", torch.float64)  # (V,)
        if torch.isnan(x).any():
            return SamplingFailure("the model produced NaN logits for this request")
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.long)
            if int(ids.max()) >= x.shape[0]:
                return SamplingFailure(f"logit_bias names token {int(ids.max())}, outside the vocabulary")
            x[ids] += torch.tensor(list(p.logit_bias.values()), dtype=torch.float64)
        if p.greedy:
            return int(x.argmax().item())
        x = x / p.temperature
        if 0 < p.top_k < x.shape[0]:
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_x, order = torch.sort(x, descending=True)
            probs = torch.softmax(sorted_x, dim=-1)
            # Drop a token when the mass *before* it already reaches top_p; the most likely
            # token is always kept, whatever top_p is.
            drop = probs.cumsum(-1) - probs >= p.top_p
            drop[0] = False
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
            x = torch.full_like(x, float("-inf")).scatter(0, order, sorted_x)
        probs = torch.softmax(x, dim=-1)
        if not torch.isfinite(probs).all():
            # +inf logits (after the temperature) make softmax NaN: the limit is argmax.
            return int(x.argmax().item())
        gen = torch.Generator().manual_seed(token_seed(p.seed, index)) if p.seed is not None else self._rng
        return int(torch.multinomial(probs, 1, generator=gen).item())
