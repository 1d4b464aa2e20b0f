"""The benchmark drivers in benchmarks/ run as plain scripts, from any working directory.

They live outside the installed packages, so each makes the repository importable itself;
``--help`` exercises that and every import without running a benchmark.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["directory_bench.py", "serving_layouts.py"])
def test_script_runs_from_elsewhere(script: str, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--out" in out.stdout
