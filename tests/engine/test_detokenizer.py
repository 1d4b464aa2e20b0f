"""Incremental detokenization: same text as a full decode, bounded work, stop strings."""

from __future__ import annotations

from engine.detokenizer import StopChecker
from tests.engine.tiny_models import make_tokenizer

TEXT = "Ferries cross at dawn: café, naïve 🚢 crème brûlée — 渡し船. " * 6


class _CountingTokenizer:
    """Wraps a tokenizer and records the longest id list it was asked to decode."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.longest = 0

    def decode(self, ids, skip_special_tokens=True):
        self.longest = max(self.longest, len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_token_by_token_text_equals_full_decode_with_bounded_windows() -> None:
    tok = _CountingTokenizer(make_tokenizer())
    ids = tok.tok.encode(TEXT, add_special_tokens=False)
    assert len(ids) > 300  # byte-level: multi-byte characters span several ids
    checker = StopChecker(tok, [])
    streamed = []
    for n in range(1, len(ids) + 1):
        assert checker.update(ids[:n]) is False
        streamed.append(checker.delta(finished=False))
    checker.flush()
    streamed.append(checker.delta(finished=True))
    assert checker.text == TEXT
    assert "".join(streamed) == TEXT
    assert all("\ufffd" not in piece for piece in streamed)  # never half a character
    assert tok.longest <= 8  # a short window per step, not the whole output


def test_stop_string_split_across_tokens_cuts_text_before_it() -> None:
    tok = make_tokenizer()
    ids = tok.encode("abc STOP def", add_special_tokens=False)
    checker = StopChecker(tok, ["STOP"])
    pieces = []
    for n in range(1, len(ids) + 1):
        if checker.update(ids[:n]):
            break
        pieces.append(checker.delta(finished=False))
    pieces.append(checker.delta(finished=True))
    assert checker.text == "abc " and "".join(pieces) == "abc "
    assert all("S" not in p for p in pieces)  # the held-back prefix of "STOP" never leaked


def test_the_checker_names_the_stop_string_that_matched_first() -> None:
    tok = make_tokenizer()
    ids = tok.encode("one two three", add_special_tokens=False)
    checker = StopChecker(tok, ["three", "two"])
    assert not any(checker.update(ids[:n]) for n in range(1, len(ids) - 6))
    assert checker.matched is None
    assert checker.update(ids)
    assert checker.matched == "two" and checker.text == "one "
