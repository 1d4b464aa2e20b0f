"""Incremental detokenization with stop strings.

Text is re-decoded from the output ids each step (cheap for chat-length outputs and
always correct across multi-byte characters); what is handed out lags behind by the
longest stop string minus one character, and by any trailing incomplete UTF-8 sequence
(decoded as U+FFFD), so a client never sees text that is later retracted.
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

    def update(self, token_ids: list[int]) -> bool:
        """Re-decode ``token_ids``; return True when a stop string appeared (text is cut before it)."""
        if self.tokenizer is None:
            return False
        old_len = len(self.text)
        self.text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        if not self.stop:
            return False
        # Only the tail can hold a new match: a stop string may straddle old and new text.
        search_from = max(0, min(old_len, len(self.text)) - self.holdback - 1)
        cut = -1
        for s in self.stop:
            i = self.text.find(s, search_from)
            if i != -1 and (cut == -1 or i < cut):
                cut = i
        if cut == -1:
            return False
        self.text = self.text[:cut]
        return True

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
