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


def test_library_modules_never_import_their_cli() -> None:
    # The CLI wraps the library (router/replay_cli.py imports router/replay.py); the reverse
    # edge, even a lazy one under ``if __name__ == "__main__"``, makes an import cycle.
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in sorted((root / "router").glob("*.py")):
        if path.stem.endswith("_cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):  # `from router.replay_cli import x`, `from router import replay_cli`
                names = [node.module or ""] + [a.name for a in node.names]
            offenders += [f"{path.name}: {n}" for n in names if n.rsplit(".", 1)[-1].endswith("_cli")]
    assert offenders == []
