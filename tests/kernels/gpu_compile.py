"""Compile the Triton kernels for an NVIDIA GPU on a machine that has none.

CI runs the kernels only in Triton's interpreter, which accepts programs the GPU compiler
rejects (a ``tl.dot`` dimension under 16, a tile needing more shared memory than an SM
has) and says nothing about registers. Here a kernel wrapper runs under the interpreter
on small CPU tensors with its launches intercepted (:func:`recorded_launches`); the
recorded launches are then compiled ahead of time for a chosen GPU
(:func:`compile_launches`) with the specialisation Triton derives at a real launch (ints
equal to 1 become constants, pointers and ints divisible by 16 get alignment hints),
through PTX to a cubin with the ``ptxas`` bundled in the triton wheel, whose ``-v``
report gives registers and spills.

The compile runs in a child process with ``TRITON_INTERPRET`` unset: a triton imported in
interpreter mode wraps its standard library (``tl.max``...) for the interpreter, and the
GPU code generator then fails on it. Uses Triton internals (``create_function_from_signature``,
``JITFunction._pack_args``): when they move, :func:`aot_supported` is False and the tests skip.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from kernels.launch import LazyKernel

REPO = Path(__file__).resolve().parents[2]
# Largest dynamic shared memory one H100 thread block may use (227 KiB).
H100_MAX_SHARED_BYTES = 232448


@dataclass
class Launch:
    """One intercepted ``kernel[grid](*args, **kwargs)``."""

    kernel: LazyKernel
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


@dataclass
class CompiledInfo:
    """What the compiled kernel needs from the GPU."""

    name: str
    shared_bytes: int
    num_warps: int
    num_stages: int
    registers: int
    spill_bytes: int  # spill stores + spill loads per thread

    def __str__(self) -> str:
        return (
            f"{self.name}: {self.shared_bytes} B shared, {self.registers} regs, {self.spill_bytes} B spilled, "
            f"{self.num_warps} warps, {self.num_stages} stages"
        )


def aot_supported() -> bool:
    """Whether this triton has the NVIDIA backend, ptxas and the internals used here."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except ImportError:
        return False
    return hasattr(JITFunction, "_pack_args")


@contextmanager
def recorded_launches() -> Iterator[list[Launch]]:
    """Within the block, Triton launches are recorded instead of run (set TRITON_INTERPRET=1
    so that the wrappers accept CPU tensors)."""
    launches: list[Launch] = []

    def getitem(self: LazyKernel, grid: Any) -> Any:
        def launch(*args: Any, **kwargs: Any) -> None:
            launches.append(Launch(self, tuple(grid), args, kwargs))

        return launch

    with mock.patch.object(LazyKernel, "__getitem__", getitem):
        yield launches


def _encode(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, bool):
        return {"bool": value}
    if isinstance(value, int):
        return {"int": value}
    if isinstance(value, float):
        return {"float": value}
    raise TypeError(f"cannot encode a kernel argument of type {type(value).__name__}")


def _decode(value: dict[str, Any]) -> Any:
    if "tensor" in value:
        dtype = getattr(torch, value["tensor"])
        buf = torch.empty(64, dtype=dtype)
        return buf if value["aligned"] else buf[1:]  # keeps the pointer's alignment class
    return next(iter(value.values()))


def compile_launches(launches: list[Launch], capability: int = 90) -> list[CompiledInfo]:
    """Compile every launch for an sm_``capability`` GPU as a real launch would.

    Raises ``AssertionError`` with the compiler's message when one does not compile.
    """
    spec = [
        {
            "module": launch.kernel.fn.__module__,
            "kernel": launch.name,
            "args": [_encode(a) for a in launch.args],
            "kwargs": {k: _encode(v) for k, v in launch.kwargs.items()},
        }
        for launch in launches
    ]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [sys.executable, "-m", "tests.kernels.gpu_compile", str(capability)],
        input=json.dumps(spec), capture_output=True, text=True, cwd=REPO, env=env, check=False,
    )
    if res.returncode != 0:
        raise AssertionError(f"compiling for sm_{capability} failed:\n{res.stderr[-6000:]}")
    return [CompiledInfo(**info) for info in json.loads(res.stdout.splitlines()[-1])]


def _compile_one(item: dict[str, Any], capability: int) -> CompiledInfo:
    """In the child process: build one launch's cubin and read ptxas's resource report."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    lazy = getattr(importlib.import_module(item["module"]), item["kernel"])
    fn = JITFunction(lazy.fn)
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    # What JITFunction.run does before compiling, minus the driver queries.
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = [_decode(a) for a in item["args"]]
    kwargs = {k: _decode(v) for k, v in item["kwargs"].items()}
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)

    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        res = subprocess.run(
            [get_ptxas(capability).path, "-v", f"--gpu-name={arch}", ptx, "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True, text=True, check=True,
        )
    log = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return CompiledInfo(
        name=item["kernel"],
        shared_bytes=int(kernel.metadata.shared),
        num_warps=int(kernel.metadata.num_warps),
        num_stages=int(kernel.metadata.num_stages),
        registers=int(regs.group(1)) if regs else -1,
        spill_bytes=int(spills.group(1)) + int(spills.group(2)) if spills else 0,
    )


if __name__ == "__main__":  # the child of compile_launches: JSON launches on stdin
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset
    cap = int(sys.argv[1])
    infos = [_compile_one(item, cap) for item in json.load(sys.stdin)]
    print(json.dumps([asdict(i) for i in infos]))
