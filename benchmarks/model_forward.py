"""Model forward pass alone: our decoder vs transformers' on the same weights, same run.

Isolates ``engine/models`` from the scheduler: fixed batches, contiguous block tables, the
torch attention backend. Workloads (default model, fp32, CPU unless --device):
  prefill   4 x 128-token prompts (ours: one flat 512-token step; transformers: a (4, 128)
            batch), logits of each prompt's last token only (both sides)
  decode    one step of B sequences at context 128 (B = 1 and 16); transformers uses its
            DynamicCache, cropped back after every step so each repetition is identical

Timing: the two sides alternate, best of --repeats. Prints ours/transformers speedups and
writes JSON to --out (default results/model_forward.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.attention import get_attention_backend
from engine.attention.base import AttentionMetadata
from engine.forward_context import ForwardContext
from engine.loader import load_model, resolve_model_path

BLOCK_SIZE = 16


def _context(kv_cache: torch.Tensor, starts: list[int], lens: list[int], blocks_per_seq: int) -> ForwardContext:
    """Metadata for sequences i = 0..B-1 owning blocks [i*blocks_per_seq, ...): tokens
    ``starts[i] .. starts[i] + lens[i]``; all-decode if every len is 1, else all-prefill."""
    tables = torch.arange(len(lens) * blocks_per_seq, dtype=torch.int32).view(len(lens), blocks_per_seq)
    slots = [
        int(tables[i, p // BLOCK_SIZE]) * BLOCK_SIZE + p % BLOCK_SIZE
        for i, (s, n) in enumerate(zip(starts, lens))
        for p in range(s, s + n)
    ]
    ctx_lens = [s + n for s, n in zip(starts, lens)]
    decode = all(n == 1 for n in lens)
    empty = torch.zeros((0, blocks_per_seq), dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        num_decode_tokens=len(lens) if decode else 0,
        decode_block_tables=tables if decode else empty,
        decode_context_lens=torch.tensor(ctx_lens if decode else [], dtype=torch.int32),
        decode_context_lens_list=ctx_lens if decode else [],
        prefill_block_tables=empty if decode else tables,
        prefill_query_start_loc=torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32),
        prefill_context_lens=torch.tensor([] if decode else ctx_lens, dtype=torch.int32),
        prefill_query_lens_list=[] if decode else list(lens),
        prefill_context_lens_list=[] if decode else ctx_lens,
        block_size=BLOCK_SIZE,
    )
    return ForwardContext(kv_cache, meta, get_attention_backend("torch"), torch.zeros(0, dtype=torch.int64))


def _best_alternating(a: Callable[[], None], b: Callable[[], None], repeats: int) -> tuple[float, float]:
    a(), b()  # warm-up
    ta, tb = float("inf"), float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a()
        ta = min(ta, time.perf_counter() - t)
        t = time.perf_counter()
        b()
        tb = min(tb, time.perf_counter() - t)
    return ta, tb


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("results/model_forward.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    path = resolve_model_path(args.model)
    model, cfg = load_model(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    plen = args.prompt_len
    blocks_per_seq = (plen + 1 + BLOCK_SIZE - 1) // BLOCK_SIZE
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, cfg.vocab_size - 100, (16, plen), generator=g)
    kv = torch.zeros(cfg.num_layers, 2, 16 * blocks_per_seq, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim)
    results: dict[str, dict[str, float]] = {}

    # Prefill: 4 prompts, last-token logits.
    n = 4
    pre_ctx = _context(kv, [0] * n, [plen] * n, blocks_per_seq)
    pre_ids, pre_pos = prompts[:n].flatten(), torch.arange(plen).repeat(n)
    last = torch.arange(1, n + 1) * plen - 1

    def ours_prefill() -> None:
        model.compute_logits(model(pre_ids, pre_pos, pre_ctx)[last])

    def hf_prefill() -> None:
        hf(prompts[:n], logits_to_keep=1)

    ours, theirs = _best_alternating(ours_prefill, hf_prefill, args.repeats)
    results["prefill_4x%d" % plen] = {"ours_s": ours, "transformers_s": theirs, "speedup": theirs / ours}

    # Decode: fill both caches with the prompts, then time one step (repeatable).
    for b in (1, 16):
        model(prompts[:b].flatten(), torch.arange(plen).repeat(b), _context(kv, [0] * b, [plen] * b, blocks_per_seq))
        dec_ctx = _context(kv, [plen] * b, [1] * b, blocks_per_seq)
        dec_ids, dec_pos = torch.full((b,), 5), torch.full((b,), plen)
        pkv = hf(prompts[:b], use_cache=True).past_key_values

        def ours_decode() -> None:
            model.compute_logits(model(dec_ids, dec_pos, dec_ctx))

        def hf_decode() -> None:
            hf(torch.full((b, 1), 5), past_key_values=pkv, use_cache=True)
            pkv.crop(-1)

        ours, theirs = _best_alternating(ours_decode, hf_decode, args.repeats)
        results[f"decode_b{b}_ctx{plen}"] = {"ours_s": ours, "transformers_s": theirs, "speedup": theirs / ours}

    print(f"{'workload':<22}{'ours ms':>10}{'transformers ms':>17}{'speedup':>9}")
    for name, r in results.items():
        print(f"{name:<22}{r['ours_s'] * 1e3:>10.1f}{r['transformers_s'] * 1e3:>17.1f}{r['speedup']:>8.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "threads": args.threads, "repeats": args.repeats, "machine": platform.processor()}
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
