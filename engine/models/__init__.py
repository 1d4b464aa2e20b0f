"""Model architectures the engine runs, behind one builder.

``build_model(cfg, dtype, device)`` returns a :class:`DecoderForCausalLM` with
uninitialised weights; fill them with ``model.load_weights(...)`` (see ``engine.loader``).
"""

from __future__ import annotations

import torch

from engine.models.config import SUPPORTED_ARCHITECTURES, ModelConfig
from engine.models.decoder import DecoderForCausalLM

__all__ = ["SUPPORTED_ARCHITECTURES", "DecoderForCausalLM", "ModelConfig", "build_model", "resolve_dtype"]


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``; ValueError for anything else."""
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"unknown floating dtype {dtype!r}; use float32, bfloat16 or float16")
    return resolved


def build_model(
    model_config: ModelConfig, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"
) -> DecoderForCausalLM:
    """Allocate the decoder for ``model_config`` on ``device`` in ``dtype`` (weights not loaded)."""
    if model_config.architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {model_config.architecture!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    model = DecoderForCausalLM(model_config, resolve_dtype(dtype), torch.device(device))
    return model.eval()
