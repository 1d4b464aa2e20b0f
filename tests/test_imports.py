"""Import hygiene that the layout promises (DESIGN.md: cluster -> router -> engine -> kernels)."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(imports: str) -> set[str]:
    code = f"import sys\n{imports}\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return set(out.stdout.split())


def test_the_engine_imports_neither_ray_nor_triton() -> None:
    # Importing triton fixes its compiled-vs-interpreted mode for the whole process, so the
    # engine defers it to the first kernel launch; and engine/ never needs Ray.
    loaded = _modules_after("import engine, engine.llm_engine, engine.model_runner")
    assert "triton" not in loaded
    assert not any(m == "ray" or m.startswith("ray.") for m in loaded)


def test_the_replica_core_is_plain_python() -> None:
    loaded = _modules_after("import cluster.replica, cluster.remote_prefill, cluster.engine_loop, cluster.wire")
    assert not any(m == "ray" or m.startswith("ray.") for m in loaded)
    assert "triton" not in loaded
