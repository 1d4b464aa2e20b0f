"""``torch.compile`` of the decoder forward (``EngineConfig.compile``), the way vLLM does on CPU.

Inductor fuses what runs between the matmuls (residual adds, RMSNorm, rotary, SiLU * up)
into a few C++ loops, so a step pays for fewer ops. Two things stay opaque, as custom ops
the compiler calls but does not trace:

- attention (``kvferry::attention``): it writes the paged KV cache and its work depends
  on per-step Python metadata, so it reads the step's :class:`ForwardContext` from
  :func:`current_context` (set by the model runner around each call);
- prepacked oneDNN linears (``kvferry::onednn_linear``): an opaque oneDNN tensor cannot
  be traced, so the op takes a key into ``_PACKED`` instead.

The token dimension is dynamic (one graph for every batch size; dynamo specialises
T == 1 into a second one). Compiled code is cached on disk by inductor
(``TORCHINDUCTOR_CACHE_DIR``, default ``~/.cache/kvferry/inductor``), so a restart
skips code generation; :class:`CompiledForward` logs how long each compile took.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from engine.forward_context import ForwardContext
from engine.models.cpu_linear import onednn_linear
from engine.models.decoder import DecoderForCausalLM

logger = logging.getLogger(__name__)

def default_cache_dir() -> Path:
    return Path(os.environ.get("KVFERRY_CACHE_DIR", Path.home() / ".cache" / "kvferry")) / "inductor"


# Inductor fixes its cache directory the first time it asks for it (registering the ops
# below may be that time): choose ours before, unless the user chose one.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default_cache_dir()))

_CONTEXT: list[ForwardContext] = []  # the step being run (a stack of at most one)
_PACKED: dict[int, tuple[torch.Tensor, int]] = {}  # key -> (oneDNN weight, out features)


@contextlib.contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[None]:
    """Make ``ctx`` the step that the ``kvferry::attention`` op serves."""
    _CONTEXT.append(ctx)
    try:
        yield
    finally:
        _CONTEXT.pop()


def current_context() -> ForwardContext:
    if not _CONTEXT:
        raise RuntimeError("kvferry::attention ran outside a forward_context()")
    return _CONTEXT[-1]


def register_packed(weight: torch.Tensor, out_features: int) -> int:
    """A key for ``kvferry::onednn_linear`` (held as long as the process runs)."""
    key = len(_PACKED)
    _PACKED[key] = (weight, out_features)
    return key


@torch.library.custom_op("kvferry::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int, scale: float) -> torch.Tensor:
    """The backend's paged attention for layer ``layer_idx`` (stores K/V, then attends)."""
    ctx = current_context()
    cache = ctx.kv_cache
    return ctx.backend.forward(q, k, v, cache[layer_idx, 0], cache[layer_idx, 1], ctx.attn_metadata, scale)


@attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int, scale: float) -> torch.Tensor:
    return torch.empty_like(q)


@torch.library.custom_op("kvferry::onednn_linear", mutates_args=())
def onednn_linear_op(x: torch.Tensor, key: int, bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + b`` with the oneDNN weight registered under ``key``."""
    return onednn_linear(x, _PACKED[key][0], bias)


@onednn_linear_op.register_fake
def _(x: torch.Tensor, key: int, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], _PACKED[key][1]))


class CompiledForward:
    """``model(input_ids, positions, ctx)`` through ``torch.compile``; logs each compile's time."""

    def __init__(self, model: DecoderForCausalLM) -> None:
        for linear in model.linears():
            if linear.packed is not None and linear.pack_key < 0:
                linear.pack_key = register_packed(linear.packed, linear.out_features)
        self._fn = torch.compile(model, dynamic=True, fullgraph=True)
        self._seen: set[bool] = set()  # T == 1 and T > 1 compile separately
        #: Seconds each first call (trace + compile, or cache load) took.
        self.compile_seconds: dict[str, float] = {}

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        single = input_ids.shape[0] == 1
        first = single not in self._seen
        t = time.perf_counter()
        with forward_context(ctx):
            out = self._fn(input_ids, positions, ctx)
        if first:
            self._seen.add(single)
            name = "T=1" if single else "T>1"
            self.compile_seconds[name] = time.perf_counter() - t
            logger.info("compiled the model forward for %s in %.1f s (cache: %s)",
                        name, self.compile_seconds[name], os.environ["TORCHINDUCTOR_CACHE_DIR"])
        return out
