"""The model's own Hugging Face tokenizer and chat template, loaded from local disk, and the
one path that turns a prompt (chat messages, text or token ids) into prompt token ids.

``PromptTokenizer`` guards the tokenizer against hostile lengths: a text that cannot fit
the context whatever it tokenizes to is refused from its length in characters, before
any tokenizing (a 20 MB prompt once kept a replica busy for half a minute). The bound is
exact for the BPE and SentencePiece vocabularies of decoder LLMs: a token never covers
more input characters than its vocabulary string has, so a text needs at least
``len(text) / longest_token`` tokens. Tokenizers with a normalizer (which may shrink the
text, e.g. Unicode composition) get a 4x slack.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.errors import ContextLengthExceeded

# A directory has a real tokenizer only if one of these exists; without them transformers
# may still build an *empty* tokenizer from tokenizer_config.json or the model type alone.
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
# Characters-per-token slack for tokenizers whose normalizer may shorten the text.
_NORMALIZER_SLACK = 4


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


def render_chat(tokenizer: Any, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """``messages`` as text, rendered with the model's own chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template; send a plain completion prompt instead")
    if not messages:
        raise ValueError("messages must not be empty")
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_chat(
    tokenizer: Any, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of ``messages`` rendered with the model's chat template.

    The template is rendered to text and then tokenized without adding special tokens,
    because templates already spell out BOS and role markers themselves.
    """
    return list(tokenizer.encode(render_chat(tokenizer, messages, add_generation_prompt), add_special_tokens=False))


def max_chars_per_token(tokenizer: Any) -> int:
    """Most input characters one token of ``tokenizer`` can stand for (see the module doc)."""
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    slack = _NORMALIZER_SLACK if backend is None or backend.normalizer is not None else 1
    return max(1, longest) * slack


class PromptTokenizer:
    """Chat messages, text or token ids -> prompt token ids, refusing what cannot fit."""

    def __init__(self, tokenizer: Any, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_chars_per_token = max_chars_per_token(tokenizer)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added); ContextLengthExceeded if it can't fit."""
        limit = self.max_model_len * self.max_chars_per_token
        if len(text) > limit:
            raise ContextLengthExceeded(
                f"the prompt has {len(text)} characters, more than this model's context of "
                f"{self.max_model_len} tokens can hold (at most {limit} characters)",
                max_model_len=self.max_model_len,
            )
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages`` rendered with the model's chat template."""
        return self.encode_text(render_chat(self.tokenizer, messages, add_generation_prompt))

    def encode_chat_with_marks(
        self, messages: Sequence[dict[str, Any]], marks: Sequence[tuple[int, int]]
    ) -> tuple[list[int], list[int]]:
        """Token ids of ``messages``, and for each mark ``(message index, characters of its
        text)`` how many leading tokens the conversation up to that point covers.

        That count is the longest common prefix of the whole prompt and the rendering of
        the conversation cut at the mark: a template closes a message with tokens of its
        own, which the whole prompt does not share at that point.
        """
        ids = self.encode_chat(messages)
        counts = []
        for index, chars in marks:
            if not 0 <= index < len(messages):
                raise ValueError(f"a cache breakpoint points at message {index}, but there are {len(messages)}")
            head = [dict(m) for m in messages[: index + 1]]
            head[-1]["content"] = str(head[-1]["content"])[:chars]
            cut = self.encode_text(render_chat(self.tokenizer, head, add_generation_prompt=False))
            n = 0
            for a, b in zip(ids, cut):
                if a != b:
                    break
                n += 1
            counts.append(n)
        return ids, counts

    def encode_prompt(self, prompt: str | Sequence[int] | None, messages: Sequence[dict[str, Any]] | None) -> list[int]:
        """The prompt of a chat (``messages``) or completion (``prompt``: text or ids) request."""
        if messages is not None:
            return self.encode_chat(messages)
        if isinstance(prompt, str):
            return self.encode_text(prompt)
        if prompt is None:
            raise ValueError("a request needs messages or a prompt")
        return [int(t) for t in prompt]
