"""Incremental detokenization with stop strings.

Each step decodes only a short window of ids (vLLM's scheme): the text of
``ids[prefix:read]`` is known, so the text of ``ids[prefix:]`` minus it is the new text.
The window starts a few tokens back so tokenizers that render a token differently at
the start of a string (leading-space markers) still see its left context. Work per step
is constant, not proportional to the output length. What is handed out lags behind by
the longest stop string minus one character, and by any trailing incomplete UTF-8
sequence (decoded as U+FFFD), so a client never sees text that is later retracted.
"""

from __future__ import annotations

from typing import Any


class StopChecker:
    """Tracks one request's text, finds stop strings, and yields safe deltas."""

    def __init__(self, tokenizer: Any | None, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.emitted = 0
        # Window offsets into the ids: text of ids[:read] is in self.text, and
        # ids[prefix:read] is the left context decoded again with each new token.
        self._prefix = 0
        self._read = 0
        # Ids seen by the last update (some may still wait in the window), and whether a
        # stop string already cut the text (nothing after it may be added then).
        self._ids: list[int] = []
        self._cut = False
        # The stop string that ended the text, if one did (Anthropic's ``stop_sequence``).
        self.matched: str | None = None

    def update(self, token_ids: list[int]) -> bool:
        """Take the output ids so far; return True when a stop string appeared (text is cut before it)."""
        if self.tokenizer is None or len(token_ids) <= self._read:
            return False
        self._ids = token_ids
        old_len = len(self.text)
        decode = self.tokenizer.decode
        known = decode(token_ids[self._prefix : self._read], skip_special_tokens=True)
        window = decode(token_ids[self._prefix :], skip_special_tokens=True)
        if window.endswith("\ufffd"):
            return False  # an incomplete character: wait for the token(s) that finish it
        self.text += window[len(known) :]
        self._prefix, self._read = self._read, len(token_ids)
        if not self.stop:
            return False
        # Only the tail can hold a new match: a stop string may straddle old and new text.
        search_from = max(0, min(old_len, len(self.text)) - self.holdback - 1)
        cut, matched = -1, None
        for s in self.stop:
            i = self.text.find(s, search_from)
            if i != -1 and (cut == -1 or i < cut):
                cut, matched = i, s
        if cut == -1:
            return False
        self.text = self.text[:cut]
        self._cut = True
        self.matched = matched
        return True

    def flush(self) -> None:
        """At the end of generation, add whatever still waits for a character's last byte
        (rendered as U+FFFD, exactly as a full decode of the ids would)."""
        if self.tokenizer is None or self._cut or len(self._ids) <= self._read:
            return
        decode = self.tokenizer.decode
        known = decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
        self.text += decode(self._ids[self._prefix :], skip_special_tokens=True)[len(known) :]
        self._prefix = self._read = len(self._ids)

    def delta(self, finished: bool) -> str:
        """Text not handed out yet that can no longer change."""
        end = len(self.text)
        if not finished:
            end -= self.holdback
            while end > self.emitted and self.text[end - 1] == "\ufffd":
                end -= 1  # an incomplete multi-byte character: wait for its other bytes
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
