"""The fingerprint that keys the disk tier: block files are only ever read back by an
engine whose KV they are.

It folds in the served model id, the KV dtype, the block size, the KV layout (layers,
KV heads, head dim) and a digest of a sample of the weights: two checkpoints served under
one name (a fine-tune, a re-quantization, the tests' random tiny models) never share
files. The sample (shape plus the first and last values of every parameter) costs
nothing next to loading the model, yet differs between any two real checkpoints.
"""

from __future__ import annotations

import torch
import xxhash

# Format of the fingerprint's inputs; bump when the block file layout changes.
_VERSION = "kvferry-disk-kv-v1"
_SAMPLE = 64


def weights_digest(model: torch.nn.Module) -> str:
    """A cheap digest of the model's weights (names, shapes, dtypes, first/last values)."""
    h = xxhash.xxh3_128()
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            flat = p.detach().reshape(-1)
            sample = torch.cat([flat[:_SAMPLE], flat[-_SAMPLE:]]).to("cpu", torch.float32)
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()


def kv_fingerprint(
    model_id: str,
    dtype: torch.dtype,
    block_size: int,
    kv_layout: tuple[int, ...],
    weights: str,
) -> str:
    """32 hex digits naming this engine's KV format; the disk tier's directory name."""
    text = "\x00".join([_VERSION, model_id, str(dtype), str(block_size), repr(tuple(kv_layout)), weights])
    return xxhash.xxh3_128_hexdigest(text.encode())
