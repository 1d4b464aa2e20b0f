"""Turns logits into tokens: greedy, temperature, top-k, top-p, reproducible seeds.

A seeded request draws its ``i``-th token from a generator seeded by ``(seed, i)``,
so the same request yields the same tokens whichever replica samples which token
(prefill replica samples the first, decode replica the rest) and whatever else shares
the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.sampling_params import SamplingParams

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, i) over 64 bits


def token_seed(seed: int, index: int) -> int:
    """Deterministic per-token seed from a request seed and the token's output index."""
    return ((seed * _SEED_MIX) ^ (index + 1) * 0xBF58476D1CE4E5B9) & ((1 << 63) - 1)


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
    ) -> list[int]:
        if logits.shape[0] != len(params):
            raise ValueError(f"{logits.shape[0]} logit rows for {len(params)} requests")
        if all(p.greedy for p in params):
            return logits.argmax(dim=-1).tolist()
        greedy_ids = logits.argmax(dim=-1).tolist()
        out: list[int] = []
        for row, (p, idx) in enumerate(zip(params, output_indices)):
            if p.greedy:
                out.append(greedy_ids[row])
            else:
                out.append(self._sample_row(logits[row], p, idx))
        return out

    def _sample_row(self, logits: torch.Tensor, p: SamplingParams, index: int) -> int:
        x = logits.float().cpu() / p.temperature  # (V,)
        if 0 < p.top_k < x.shape[0]:
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_x, order = torch.sort(x, descending=True)
            probs = torch.softmax(sorted_x, dim=-1)
            # Drop a token when the mass *before* it already reaches top_p (keeps >= 1 token).
            drop = probs.cumsum(-1) - probs >= p.top_p
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
            x = torch.full_like(x, float("-inf")).scatter(0, order, sorted_x)
        probs = torch.softmax(x, dim=-1)
        if p.seed is not None:
            gen = torch.Generator().manual_seed(token_seed(p.seed, index))
        else:
            gen = self._rng
        return int(torch.multinomial(probs, 1, generator=gen).item())
