"""Fresh prefills (nothing cached before them) with torch SDPA on the step's dense q/k/v.

A prefill sequence whose context is exactly its new tokens attends only to keys that are
already dense in the step's ``k``/``v``: no paged reads are needed, and torch's fused SDPA
kernels (flash / memory-efficient on CUDA) take the tokens as they are. Causal masking is
plain ``is_causal=True`` because query and key lengths are equal (top-left and
bottom-right alignment coincide). GQA goes through ``enable_gqa`` (torch >= 2.5), which
the flash kernel serves without repeating K/V per query head.

Consecutive sequences of equal length become one batched call ``(N, H, L, D)``: a step of
many equal prompts (a benchmark, a batch job) costs one launch, not N.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def equal_length_runs(query_lens: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(first_row, num_seqs, seq_len)`` for each run of consecutive equal lengths."""
    runs: list[tuple[int, int, int]] = []
    row = 0
    for n in query_lens:
        if runs and runs[-1][2] == n:
            first, count, _ = runs[-1]
            runs[-1] = (first, count + 1, n)
        else:
            runs.append((row, 1, n))
        row += n
    return runs


def sdpa_fresh_prefill(
    q: torch.Tensor,  # (T, H, D): the sequences' queries back to back
    k: torch.Tensor,  # (T, H_kv, D): their new (and only) keys
    v: torch.Tensor,  # (T, H_kv, D)
    query_lens: Sequence[int],  # host-side lengths, sum == T
    scale: float,
    out: torch.Tensor,  # (T, H, D), written in place
) -> torch.Tensor:  # out
    """Causal self-attention of each sequence over its own tokens, written into ``out``."""
    total = sum(query_lens)
    if q.shape[0] != total or k.shape[0] != total or v.shape[0] != total or out.shape != q.shape:
        raise ValueError(
            f"sdpa_fresh_prefill: lengths sum to {total} but q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}, out {tuple(out.shape)}"
        )
    gqa = q.shape[1] != k.shape[1]
    for row, num_seqs, seq_len in equal_length_runs(query_lens):
        rows = slice(row, row + num_seqs * seq_len)
        # (N*L, H, D) -> (N, L, H, D) -> (N, H, L, D): a strided view, no copy. 4-D on
        # purpose: torch's fused CPU kernel only takes batched inputs, and the CUDA kernels
        # accept any layout whose last dim is contiguous.
        qt, kt, vt = (x[rows].unflatten(0, (num_seqs, seq_len)).transpose(1, 2) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
        out[rows].unflatten(0, (num_seqs, seq_len)).copy_(o.transpose(1, 2))  # (N, L, H, D)
    return out
