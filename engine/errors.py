"""Typed errors the engine raises for a caller's input, so nobody parses messages.

They subclass ``ValueError`` (the engine's "caller's mistake" type, vLLM style), so code
that only cares that the input was refused can keep catching ``ValueError``.
"""

from __future__ import annotations


class ContextLengthExceeded(ValueError):
    """The prompt plus the tokens asked for do not fit the model's context."""

    def __init__(self, message: str, *, max_model_len: int) -> None:
        super().__init__(message)
        self.max_model_len = max_model_len


class InvalidTokenIds(ValueError):
    """Token ids outside the vocabulary (or an empty prompt); ``field`` names which input:
    "prompt" or "logit_bias"."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field
