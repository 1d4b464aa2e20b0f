"""A streaming chat request run in a thread, for drills that break things while streams run."""

from __future__ import annotations

import json
import threading
import time

import httpx


def chat_body(content: str, max_tokens: int, stream: bool = False, model: str = "llama") -> dict:
    """A greedy chat request that always generates ``max_tokens`` (comparable token for token)."""
    return {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream,
            "messages": [{"role": "user", "content": content}]}


class ChatStream(threading.Thread):
    """One streaming chat in a thread: its decode replica, its text, and any error event."""

    def __init__(self, url: str, content: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.content, self.max_tokens = url, content, max_tokens
        self.replica: str | None = None
        self.text, self.errors, self.started = "", [], threading.Event()
        self.ended_at: float | None = None
        self.status: int | None = None  # asserted by the test (an assert in a thread fails nothing)

    def run(self) -> None:
        try:
            self._stream()
        except httpx.HTTPError as e:  # a dropped connection is a broken stream, recorded as such
            self.errors.append({"exception": repr(e)})
            self.ended_at = time.monotonic()
            self.started.set()

    def _stream(self) -> None:
        body = chat_body(self.content, self.max_tokens, True)
        with httpx.stream("POST", self.url + "/v1/chat/completions", json=body, timeout=60) as r:
            self.status = r.status_code
            if r.status_code != 200:
                self.errors.append({"status": r.status_code, "body": r.read().decode(errors="replace")})
                self.ended_at = time.monotonic()
                self.started.set()
                return
            self.replica = r.headers["x-kvferry-decode-replica"]
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    self.errors.append(event["error"])
                    continue
                self.text += event["choices"][0]["delta"].get("content") or ""
                self.started.set()
        self.ended_at = time.monotonic()
        self.started.set()
