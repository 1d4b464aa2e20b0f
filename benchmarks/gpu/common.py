"""Shared plumbing for the GPU benchmarks: models, peers measured in the same run, results.

Every figure is reported as a ratio against a peer measured in the same process on the
same device (device-to-device copy bandwidth, a bf16 8192^3 GEMM, transformers
``generate``), so numbers from different machines stay comparable. Models are random
bf16 weights with the real shapes of public configs, built from transformers configs:
nothing is downloaded. A built model is kept on disk and reused by the next script
(Llama-3.1-8B is 16 GB: one copy per script would fill a 64 GB disk in four runs).
``--smoke`` swaps in a tiny model on CPU to exercise the code path.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script: make `engine`, `kernels` importable
    sys.path.insert(0, str(REPO))

RESULTS_DIR = REPO / "results"
# Built random-weight models, reused across scripts and runs ($KVFERRY_BENCH_MODELS).
MODELS_DIR = Path(os.environ.get("KVFERRY_BENCH_MODELS", Path(tempfile.gettempdir()) / "kvferry-bench-models"))

# Real shapes of the benchmarked models (random weights; no download).
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(
        arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_theta=500000.0,
    ),
    "qwen3-0.6b": dict(
        arch="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_theta=1000000.0,
    ),
    # --smoke: the same code path on CPU in seconds.
    "tiny": dict(
        arch="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_theta=10000.0,
    ),
}


def base_parser(description: str) -> argparse.ArgumentParser:
    """Arguments every benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU: check the script runs")
    p.add_argument("--models", nargs="+", default=["qwen3-0.6b", "llama-3.1-8b"], choices=sorted(MODEL_CONFIGS))
    p.add_argument("--backend", default="triton", help="engine attention backend (triton, flash_attn, torch)")
    p.add_argument(
        "--fused-kernels", default="auto", choices=["auto", "on", "off"],
        help="engine fused RMSNorm/rope Triton kernels (EngineConfig.fused_kernels)",
    )
    p.add_argument(
        "--prefill-attention", default="auto", choices=["auto", "triton", "sdpa"],
        help="prefill path of the triton backend (EngineConfig.prefill_attention)",
    )
    p.add_argument("--out", type=Path, default=None, help="result JSON (default results/<name>.json)")
    return p


def setup(args: argparse.Namespace) -> dict[str, Any]:
    """Device, dtype and backend for this run (the smoke mode forces CPU/fp32/torch)."""
    if args.smoke:
        args.models = ["tiny"]
        return {"device": "cpu", "dtype": "float32", "backend": "torch", "fused_kernels": "off",
                "prefill_attention": "auto"}
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (use --smoke to check it on CPU)")
    return {"device": "cuda", "dtype": "bfloat16", "backend": args.backend,
            "fused_kernels": getattr(args, "fused_kernels", "auto"),
            "prefill_attention": getattr(args, "prefill_attention", "auto")}


def hf_config(name: str) -> Any:
    """The transformers config of model ``name``."""
    from transformers import LlamaConfig, Qwen3Config

    kw = dict(MODEL_CONFIGS[name])
    cls = {"llama": LlamaConfig, "qwen3": Qwen3Config}[kw.pop("arch")]
    return cls(**kw, bos_token_id=1, eos_token_id=2)


def build_model_dir(name: str, device: str, dtype: str, root: Path | None = None) -> Path:
    """Random-weight checkpoint of model ``name`` in ``dtype``, built on ``device`` once.

    Kept under ``root`` (default :data:`MODELS_DIR`) and reused while its marker file
    exists; a build interrupted half-way is discarded and redone.
    """
    from transformers import AutoModelForCausalLM

    path = (root or MODELS_DIR) / f"{name}-{dtype}"
    done = path / ".complete"
    if done.exists():
        return path
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    with torch.device(device):  # initialise on the GPU: an 8B model on CPU takes minutes
        model = AutoModelForCausalLM.from_config(hf_config(name), dtype=torch_dtype)
    model.save_pretrained(path)
    del model
    release_memory(device)
    done.touch()
    return path


def release_memory(device: str) -> None:
    """Give memory of dropped objects (an engine, a model) back before the next one loads.

    Engines hold reference cycles, so ``del`` alone leaves their weights, KV cache and
    CUDA-graph pools allocated until the cycle collector runs.
    """
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def param_bytes(name: str, dtype_bytes: int = 2) -> int:
    """Bytes of weights a decode step reads (every parameter once; tied embeddings count once)."""
    c = MODEL_CONFIGS[name]
    h, i, layers, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    q = c["num_attention_heads"] * c["head_dim"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
    emb = v * h * (1 if c["tie_word_embeddings"] else 2)
    return (layers * per_layer + emb + h) * dtype_bytes


def decode_weight_bytes(name: str, dtype_bytes: int = 2) -> int:
    """Bytes of weights one decode step reads from memory.

    Every parameter once, except the input embedding table of an untied model: a step
    reads only its batch's rows of it (the LM head, which has the same shape, is read
    whole). Tied embeddings are one matrix, read whole as the LM head.
    """
    c = MODEL_CONFIGS[name]
    untied_input_embedding = 0 if c["tie_word_embeddings"] else c["vocab_size"] * c["hidden_size"]
    return param_bytes(name, dtype_bytes) - untied_input_embedding * dtype_bytes


def kv_bytes_per_token(name: str, dtype_bytes: int = 2) -> int:
    """Bytes of K and V one token occupies across all layers."""
    c = MODEL_CONFIGS[name]
    return c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * c["head_dim"] * dtype_bytes


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], device: str, warmup: int = 3, iters: int = 10) -> float:
    """Median seconds per call of ``fn`` (synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, bytes/s, counting the bytes read plus those written."""
    nbytes = min(nbytes, 1 << 24) if device == "cpu" else nbytes
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = time_fn(lambda: dst.copy_(src), device)
    del src, dst
    release_memory(device)
    return 2 * nbytes / seconds


def gemm_peak(device: str, dtype: str, n: int = 8192) -> float:
    """FLOP/s of an ``n^3`` matmul in ``dtype``: the prefill roofline."""
    n = min(n, 512) if device == "cpu" else n
    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    b = torch.randn_like(a)
    seconds = time_fn(lambda: a @ b, device)
    del a, b
    release_memory(device)
    return 2 * n**3 / seconds


def device_info(device: str) -> dict[str, Any]:
    info = {"device": device, "torch": torch.__version__, "python": platform.python_version()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_results(name: str, args: argparse.Namespace, env: dict[str, Any], rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` plus run metadata to results/<name>.json and print where."""
    path = args.out or RESULTS_DIR / f"{name}{'_smoke' if args.smoke else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "smoke": args.smoke, **env, **device_info(env["device"]), "rows": rows}
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")
    return path


def make_engine(model_dir: Path, env: dict[str, Any], **options: Any) -> Any:
    """An LLMEngine on the benchmark's device/dtype/backend."""
    from engine import LLMEngine

    kernels = {k: env[k] for k in ("fused_kernels", "prefill_attention") if k in env}
    return LLMEngine.from_pretrained(
        str(model_dir), dtype=env["dtype"], device=env["device"], attention_backend=env["backend"],
        **{**kernels, **options},
    )


def random_prompt(n: int, vocab: int, seed: int) -> list[int]:
    """``n`` random token ids (random weights make text meaningless anyway)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()
