"""Kernel tests run every Triton kernel against its torch reference.

On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, fp32 and fp16: the
interpreter computes bf16 wrong); on a CUDA machine the ``gpu`` cases run them compiled,
in bf16 and fp16. ``kernels.launch.lazy_jit`` picks the mode at launch time, so the
``case`` fixture can switch it per test.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
import torch

# Before anything imports triton: CPU runs (CI) interpret unless told otherwise.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from tests.kernels.kernel_test_inputs import CASES, Case  # noqa: E402


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Case:
    """A (device, dtype) case, with the Triton interpreter switched on for CPU only."""
    c: Case = request.param
    if c.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setenv("TRITON_INTERPRET", "1" if c.device == "cpu" else "0")
    torch.manual_seed(0)
    return c


@pytest.fixture
def compiled_mode_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton in compiled mode on a CPU-only tensor: launches must be refused clearly."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


GPU_BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu"


@pytest.fixture
def gpu_benchmark(monkeypatch: pytest.MonkeyPatch):
    """Import a ``benchmarks/gpu`` script by module name, the interpreter on for its smoke run."""
    monkeypatch.syspath_prepend(str(GPU_BENCH_DIR))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # monkeypatch restores it afterwards
    return importlib.import_module
