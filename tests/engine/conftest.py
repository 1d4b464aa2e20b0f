"""Engine test fixtures: tiny random models built once per session, HF greedy references."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.engine.tiny_models import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """``tiny_model_dir(arch)`` -> a saved tiny model dir, built once per arch per session."""
    root = tmp_path_factory.mktemp("tiny-models")
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = make_tiny_model(arch, root)
        return made[arch]

    return get


@torch.no_grad()
def hf_greedy(hf_model, prompt: list[int], num_tokens: int) -> list[int]:
    """Greedy continuation by full recomputation with transformers (no cache, no EOS stop)."""
    ids = list(prompt)
    for _ in range(num_tokens):
        logits = hf_model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt) :]
