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


@pytest.mark.parametrize("script", ["directory_bench.py", "serving_layouts.py", "promote_cost.py", "tiebreak_skew.py",
                                    "kv_tiers_bench.py"])
def test_script_runs_from_elsewhere(script: str, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--out" in out.stdout


def test_serving_layouts_ratio_survives_a_layout_without_a_figure() -> None:
    """A layout whose requests each stream one chunk has no inter-token latencies: its ratio
    is None, not a KeyError that loses the whole run's results."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("serving_layouts", ROOT / "benchmarks" / "serving_layouts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod._ratio({"itl_s": {}}, {"itl_s": {"p50": 0.1}}, "itl_s", "p50") is None
    assert mod._ratio({"ttft_s": {"p50": 0.3}}, {"ttft_s": {"p50": 0.2}}, "ttft_s", "p50") == pytest.approx(1.5)


def test_docs_figure_script_runs_from_elsewhere(tmp_path: Path) -> None:
    """docs/figures/pools_dashboard.py regenerates the Pools figure in docs/deploy.md."""
    out = subprocess.run([sys.executable, str(ROOT / "docs" / "figures" / "pools_dashboard.py"), "--help"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--out" in out.stdout and "--conversations" in out.stdout
