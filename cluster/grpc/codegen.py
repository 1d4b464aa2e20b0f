"""Regenerate ``kvferry_pb2.py``, ``kvferry_pb2.pyi`` and ``kvferry_pb2_grpc.py`` from the proto.

protoc is run from the repository root (``-I`` the root, the proto named as
``cluster/grpc/kvferry.proto``), so the generated service module imports its messages as
``from cluster.grpc import kvferry_pb2`` and the package imports cleanly: no generated
file needs editing. ``tests/cluster/test_grpc_codegen.py`` regenerates into a temporary
directory and fails when the checked-in files differ.

    python -m cluster.grpc.codegen          # rewrite the checked-in modules
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = Path("cluster/grpc/kvferry.proto")
GENERATED = ("kvferry_pb2.py", "kvferry_pb2.pyi", "kvferry_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    """Run protoc (grpcio-tools) into ``out_root``; return the generated files."""
    from grpc_tools import protoc  # a dev dependency (the `test` extra): only when regenerating

    out_root.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{ROOT}", f"--python_out={out_root}", f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}", str(ROOT / PROTO)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    return [out_root / PROTO.parent / name for name in GENERATED]


def main() -> None:
    for path in generate(ROOT):
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
