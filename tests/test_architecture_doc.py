"""docs/architecture.md walks one request through at most 20 files, each named once, all real."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _walk() -> list[str]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## The walk", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\d+\. `([^`]+)`", section, re.M)


def test_the_walk_names_at_most_20_real_files_once_each() -> None:
    walk = _walk()
    assert 15 <= len(walk) <= 20, walk
    assert len(set(walk)) == len(walk), "a file is named twice"
    missing = [p for p in walk if not (ROOT / p).exists()]
    assert missing == []


def test_the_walk_starts_at_http_and_reaches_the_engine_core() -> None:
    walk = _walk()
    assert walk[0] == "cluster/ingress.py"
    for must in ("cluster/wire.py", "cluster/replica.py", "cluster/remote_prefill.py", "engine/llm_engine.py",
                 "engine/kv_transfer.py", "engine/sampler.py"):
        assert must in walk, must
