"""Shared launch plumbing for the Triton kernels: lazy JIT and argument checks.

``triton.jit`` decides between compiled and interpreted execution when it decorates a
function, from ``TRITON_INTERPRET``. Decorating at import time would make the mode depend
on which test module happened to import ``kernels`` first, so :func:`lazy_jit` defers the
decision to the first launch and keeps one build per mode.

Every wrapper validates its arguments with the ``check_*`` helpers before launching: a
wrong shape, dtype or stride given to a Triton kernel reads or writes the wrong memory
silently, so we raise :class:`ValueError` (a caller's mistake) instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

try:  # Triton is optional on CPU-only installs; the torch references still work.
    import triton
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    _knobs = None


def triton_available() -> bool:
    """True when the ``triton`` package imports."""
    return triton is not None


def interpret_mode() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    if _knobs is not None:
        return bool(_knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def can_launch(device: torch.device) -> bool:
    """True when a Triton kernel can run on tensors of ``device`` right now."""
    if triton is None:
        return False
    return device.type == "cuda" or interpret_mode()


class LazyKernel:
    """A ``@triton.jit`` function built at first launch, once per interpreter mode.

    Launches go to the device of the first tensor argument: Triton itself launches on the
    *current* CUDA device, so a cache on ``cuda:1`` while ``cuda:0`` is current would be
    read through the wrong device's context.
    """

    def __init__(self, fn: Callable[..., Any], **jit_kwargs: Any) -> None:
        self.fn = fn
        self.jit_kwargs = jit_kwargs
        self._built: dict[bool, Any] = {}

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        if triton is None:
            raise RuntimeError("triton is not installed; install kvferry[triton]")
        mode = interpret_mode()
        kernel = self._built.get(mode)
        if kernel is None:
            kernel = triton.jit(self.fn, **self.jit_kwargs)
            self._built[mode] = kernel
        launch = kernel[grid]

        def on_tensor_device(*args: Any, **kwargs: Any) -> Any:
            for arg in args:
                if isinstance(arg, torch.Tensor):
                    if arg.is_cuda and arg.device.index != torch.cuda.current_device():
                        with torch.cuda.device(arg.device):
                            return launch(*args, **kwargs)
                    break
            return launch(*args, **kwargs)

        return on_tensor_device


def lazy_jit(fn: Callable[..., Any]) -> LazyKernel:
    """Decorator: like ``triton.jit`` but the compile/interpret choice is made at launch."""
    return LazyKernel(fn)


def check_launchable(name: str, *tensors: torch.Tensor) -> None:
    """All tensors on one device where Triton can run (CUDA, or CPU under the interpreter)."""
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"{name}: tensors on different devices ({device} and {t.device})")
    if triton is None:
        raise ValueError(f"{name}: triton is not installed; use the torch reference")
    if not can_launch(device):
        raise ValueError(
            f"{name}: Triton kernels need CUDA tensors (got {device}); on CPU set "
            "TRITON_INTERPRET=1 or use the torch reference"
        )


def check_shape(name: str, arg: str, t: torch.Tensor, shape: Sequence[int | None]) -> None:
    """``t.shape`` matches ``shape`` (``None`` = any size in that dimension)."""
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name}: {arg} has shape {tuple(t.shape)}, expected {want}")


def check_dtype(name: str, arg: str, t: torch.Tensor, dtypes: Sequence[torch.dtype]) -> None:
    """``t.dtype`` is one of ``dtypes``."""
    if t.dtype not in dtypes:
        raise ValueError(f"{name}: {arg} has dtype {t.dtype}, expected one of {list(dtypes)}")


def check_inner_contiguous(name: str, arg: str, t: torch.Tensor, num_dims: int) -> None:
    """The last ``num_dims`` dimensions are densely packed (the kernels index them flat)."""
    expected = 1
    for dim in range(t.dim() - 1, t.dim() - 1 - num_dims, -1):
        if t.shape[dim] != 1 and t.stride(dim) != expected:
            raise ValueError(
                f"{name}: {arg} must be contiguous in its last {num_dims} dims "
                f"(shape {tuple(t.shape)}, strides {t.stride()})"
            )
        expected *= t.shape[dim]


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_paged_layout_and_out(
    name: str,
    q: torch.Tensor,  # (N, H, D)
    k_cache: torch.Tensor,  # (num_blocks, block_size, H_kv, D)
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # (B, max_blocks)
    out: torch.Tensor | None,
) -> torch.Tensor:
    """Checks shared by the paged attention kernels; returns ``out`` (allocated if None)."""
    h, h_kv = q.shape[1], k_cache.shape[2]
    if h % h_kv:
        raise ValueError(f"{name}: {h} query heads is not a multiple of {h_kv} KV heads")
    check_inner_contiguous(name, "q", q, 1)
    if not k_cache.is_contiguous() or not v_cache.is_contiguous():
        raise ValueError(f"{name}: k_cache and v_cache must be contiguous")
    if block_tables.stride(1) != 1:
        raise ValueError(f"{name}: block_tables must be contiguous along its last dim")
    if out is None:
        return torch.empty_like(q)
    check_shape(name, "out", out, tuple(q.shape))
    check_dtype(name, "out", out, (q.dtype,))
    check_inner_contiguous(name, "out", out, 1)
    return out


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``n`` (Triton block shapes must be powers of two)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
