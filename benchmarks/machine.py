"""The machine a benchmark ran on, as its results record it: CPU model and vector ISA.

One reader for every benchmark script (each imports it as ``machine``: a script's own
folder is first on ``sys.path``). ``lscpu`` where it exists, else ``/proc/cpuinfo``.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path


def _fields() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        out = ""
    if not out:
        try:
            out = Path("/proc/cpuinfo").read_text()
        except OSError:
            out = ""
    fields: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    return fields


def cpu_info() -> dict[str, str]:
    """``{"cpu_model": ..., "isa": "avx avx2 fma ..."}`` (the AVX/AMX/FMA flags)."""
    fields = _fields()
    model = fields.get("model name") or platform.processor() or "unknown CPU"
    flags = fields.get("flags", "").split()
    return {"cpu_model": model, "isa": " ".join(f for f in flags if f.startswith(("avx", "amx", "fma")))}
