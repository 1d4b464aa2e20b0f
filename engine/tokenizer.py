"""The model's own Hugging Face tokenizer and chat template, loaded from local disk."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

# A directory has a real tokenizer only if one of these exists; without them transformers
# may still build an *empty* tokenizer from tokenizer_config.json or the model type alone.
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(path: Path | str) -> Any:
    """The HF tokenizer saved in the model directory ``path`` (never downloads)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a model directory")
    if not any((path / name).is_file() for name in _VOCAB_FILES):
        raise ValueError(f"{path} has no tokenizer files ({', '.join(_VOCAB_FILES)}); pass token ids instead of text")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} has no usable tokenizer ({e}); pass token ids instead of text") from e


def encode_chat(
    tokenizer: Any, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of ``messages`` rendered with the model's chat template.

    The template is rendered to text and then tokenized without adding special tokens,
    because templates already spell out BOS and role markers themselves.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template; send a plain completion prompt instead")
    if not messages:
        raise ValueError("messages must not be empty")
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return list(tokenizer.encode(text, add_special_tokens=False))
