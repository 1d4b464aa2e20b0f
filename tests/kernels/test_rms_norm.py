"""rms_norm / fused_add_rms_norm (Triton) against their torch references and the engine's RMSNorm."""

from __future__ import annotations

import pytest
import torch

from engine.models.layers import RMSNorm
from kernels.rms_norm import (
    fused_add_rms_norm,
    fused_add_rms_norm_reference,
    rms_norm,
    rms_norm_reference,
)

EPS = 1e-6


def _weight(case, n):
    # Away from 1 so a missing or misplaced weight multiply shows.
    return (1.0 + 0.5 * torch.randn(n, device=case.device)).to(case.dtype)


def _close(a, b, case):
    # One rounding of the normalised value, then one of the product: within 2 ulp of |y|~3.
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[case.dtype]
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_fused_add_matches_reference_and_updates_residual_in_place(case):
    t, n = 5, 48  # n not a power of two: the masked tail must not enter the mean
    x = torch.randn(t, n, device=case.device, dtype=case.dtype)
    residual = torch.randn(t, n, device=case.device, dtype=case.dtype)
    w = _weight(case, n)
    res_ref = residual.clone()
    ptr = residual.data_ptr()
    out = fused_add_rms_norm(x, residual, w, EPS)
    out_ref = fused_add_rms_norm_reference(x, res_ref, w, EPS)
    # The add is one rounding in both, so the residual stream is bit-identical.
    assert residual.data_ptr() == ptr and torch.equal(residual, res_ref)
    _close(out, out_ref, case)
    assert out.is_contiguous() and out.data_ptr() != ptr


def test_fused_add_with_strided_inputs(case):
    t, n = 4, 32
    # x and the residual as column slices of wider buffers: rows strided, last dim dense.
    x_buf = torch.randn(t, 3 * n, device=case.device, dtype=case.dtype)
    r_buf = torch.randn(t, 2 * n, device=case.device, dtype=case.dtype)
    x, residual = x_buf[:, n : 2 * n], r_buf[:, :n]
    untouched = r_buf[:, n:].clone()
    w = _weight(case, n)
    res_ref = residual.clone()
    out = fused_add_rms_norm(x, residual, w, EPS)
    out_ref = fused_add_rms_norm_reference(x, res_ref, w, EPS)
    assert torch.equal(residual, res_ref)
    assert torch.equal(r_buf[:, n:], untouched)  # the kernel wrote only the residual's columns
    _close(out, out_ref, case)


def test_rms_norm_rows_of_hidden(case):
    x = 3.0 * torch.randn(6, 40, device=case.device, dtype=case.dtype)
    w = _weight(case, 40)
    _close(rms_norm(x, w, EPS), rms_norm_reference(x, w, EPS), case)


def test_qk_norm_on_strided_head_views(case):
    # Qwen3's q/k norm: (T, H, D) heads of a fused QKV output, normalised over D.
    t, h, h_kv, d = 3, 4, 2, 16
    qkv = torch.randn(t, (h + 2 * h_kv) * d, device=case.device, dtype=case.dtype)
    q = qkv[:, : h * d].view(t, h, d)
    k = qkv[:, h * d : (h + h_kv) * d].view(t, h_kv, d)
    w = _weight(case, d)
    for x in (q, k):
        out = rms_norm(x, w, EPS)
        assert out.shape == x.shape and out.is_contiguous()
        _close(out, rms_norm_reference(x, w, EPS), case)


def test_half_precision_rounds_before_the_weight_multiply(case):
    if case.dtype == torch.float32:
        pytest.skip("fp32 has no intermediate rounding")
    x = torch.randn(64, 64, device=case.device, dtype=case.dtype)
    w = _weight(case, 64)
    out = rms_norm(x, w, EPS)
    hf = rms_norm_reference(x, w, EPS)
    # The other plausible semantics: fp32 normalised value times weight, rounded once.
    once = (torch.nn.functional.rms_norm(x.float(), (64,), None, EPS) * w.float()).to(case.dtype)
    differs_from_hf = (out != hf).float().mean().item()
    differs_from_once = (out != once).float().mean().item()
    assert differs_from_hf < 0.01 < differs_from_once


def test_references_are_the_engine_rmsnorm():
    # The references are the spec of the fused path: they must be the module's torch ops.
    for dtype in (torch.float32, torch.float16):
        norm = RMSNorm(24, EPS, dtype, "cpu")
        norm.weight.copy_(1.0 + 0.3 * torch.randn(24))
        x, residual = torch.randn(3, 24).to(dtype), torch.randn(3, 24).to(dtype)
        assert torch.equal(norm(x), rms_norm_reference(x, norm.weight, EPS))
        r1, r2 = residual.clone(), residual.clone()
        y, _ = norm.add_and_norm(x, r1)
        assert torch.equal(y, fused_add_rms_norm_reference(x, r2, norm.weight, EPS))
        assert torch.equal(r1, r2)


def test_module_fused_flag_runs_the_kernel(case):
    norm = RMSNorm(32, EPS, case.dtype, case.device)
    norm.weight.copy_(_weight(case, 32))
    x = torch.randn(4, 32, device=case.device, dtype=case.dtype)
    r_fused = torch.randn_like(x)
    r_torch = r_fused.clone()
    y_fused, res = norm.add_and_norm(x, r_fused, fused=True)
    y_torch, _ = norm.add_and_norm(x, r_torch)
    assert res is r_fused and torch.equal(r_fused, r_torch)
    _close(y_fused, y_torch, case)
    _close(norm(x, fused=True), norm(x), case)


def test_empty_batch(case):
    x = torch.zeros(0, 16, device=case.device, dtype=case.dtype)
    w = _weight(case, 16)
    assert fused_add_rms_norm(x, x.clone(), w, EPS).shape == (0, 16)
    assert rms_norm(x.view(0, 2, 8), w[:8], EPS).shape == (0, 2, 8)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update(w=a["w"][:-1]), "weight has shape"),
        (lambda a: a.update(w=a["w"].float() if a["w"].dtype != torch.float32 else a["w"].half()), "weight has dtype"),
        (lambda a: a.update(r=a["r"][:-1]), "residual has shape"),
        (lambda a: a.update(r=a["r"].float() if a["r"].dtype != torch.float32 else a["r"].half()), "residual has dtype"),
        (lambda a: a.update(x=a["x"].t().contiguous().t()), "x must be contiguous"),
        (lambda a: a.update(r=a["r"].t().contiguous().t()), "residual must be contiguous"),
        (lambda a: a.update(x=a["x"][None]), "x has shape"),
        (lambda a: a.update(x=a["x"].int(), r=a["r"].int()), "x has dtype"),
    ],
)
def test_fused_add_bad_arguments_raise_value_error(case, mutate, message):
    args = {
        "x": torch.randn(4, 16, device=case.device, dtype=case.dtype),
        "r": torch.randn(4, 16, device=case.device, dtype=case.dtype),
        "w": _weight(case, 16),
    }
    mutate(args)
    with pytest.raises(ValueError, match=message):
        fused_add_rms_norm(args["x"], args["r"], args["w"], EPS)


@pytest.mark.parametrize(
    "x_shape, w_size, message",
    [((2, 3, 4, 8), 8, "x must be"), ((4, 8), 6, "weight has shape"), ((8,), 8, "x must be")],
)
def test_rms_norm_bad_arguments_raise_value_error(case, x_shape, w_size, message):
    x = torch.randn(x_shape, device=case.device, dtype=case.dtype)
    with pytest.raises(ValueError, match=message):
        rms_norm(x, _weight(case, w_size), EPS)


def test_cpu_tensors_without_interpreter_are_refused(compiled_mode_on_cpu):
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        fused_add_rms_norm(x, x.clone(), torch.ones(8), EPS)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        rms_norm(x, torch.ones(8), EPS)
