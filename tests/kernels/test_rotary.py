"""rotary_embedding (Triton) against its torch reference and the engine's apply_rotary."""

from __future__ import annotations

import pytest
import torch

from engine.models.rotary import RotaryEmbedding, apply_rotary, rotate_qk
from kernels.rotary import (
    apply_rotary_reference,
    rotary_embedding,
    rotary_embedding_reference,
)


def _inputs(case, t=7, h=4, h_kv=2, d=16, scaling=None):
    """q/k as strided views of a fused QKV output, cos/sin as the engine computes them."""
    dev, dt = case.device, case.dtype
    qkv = torch.randn(t, (h + 2 * h_kv) * d, device=dev, dtype=dt)
    q = qkv[:, : h * d].view(t, h, d)  # (T, H, D), row stride (H + 2 H_kv) * D
    k = qkv[:, h * d : (h + h_kv) * d].view(t, h_kv, d)
    rope = RotaryEmbedding(d, 10000.0, scaling or {}, dev)
    positions = torch.randint(0, 500, (t,), device=dev)
    cos, sin = rope.cos_sin(positions, dt)  # (T, 1, D/2)
    return q, k, cos, sin


def _close(a, b, case):
    # The kernel rounds once from fp32; the torch ops round after every op (<= ~2 ulp).
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[case.dtype]
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("h, h_kv, d", [(4, 2, 16), (3, 1, 8), (2, 2, 24)])
def test_matches_reference_on_strided_views(case, h, h_kv, d):
    # GQA, MQA, and a head_dim whose half (12) is not a power of two (masked lanes).
    q, k, cos, sin = _inputs(case, h=h, h_kv=h_kv, d=d)
    assert not q.is_contiguous() and not k.is_contiguous()
    q_out, k_out = rotary_embedding(q, k, cos, sin)
    q_ref, k_ref = rotary_embedding_reference(q, k, cos, sin)
    assert q_out.shape == q.shape and k_out.shape == k.shape
    assert q_out.is_contiguous() and k_out.is_contiguous()
    _close(q_out, q_ref, case)
    _close(k_out, k_ref, case)


def test_inputs_are_not_modified(case):
    q, k, cos, sin = _inputs(case)
    q0, k0 = q.clone(), k.clone()
    rotary_embedding(q, k, cos, sin)
    assert torch.equal(q, q0) and torch.equal(k, k0)


def test_rotation_preserves_pair_norms(case):
    # A rotation: |(x_i, x_{i+D/2})| is unchanged, which a swapped sin sign would still
    # pass, but a swapped half or a wrong cos/sin row would not.
    q, k, cos, sin = _inputs(case, scaling={"rope_type": "linear", "factor": 2.0})
    q_out, _ = rotary_embedding(q, k, cos, sin)
    half = q.shape[-1] // 2

    def pair_norm(x):
        x = x.float()
        return x[..., :half] ** 2 + x[..., half:] ** 2

    torch.testing.assert_close(pair_norm(q_out), pair_norm(q), atol=0.05, rtol=0.02)


def test_position_zero_is_identity(case):
    q, k, _, _ = _inputs(case, t=3)
    rope = RotaryEmbedding(q.shape[-1], 10000.0, {}, case.device)
    cos, sin = rope.cos_sin(torch.zeros(3, dtype=torch.long, device=case.device), case.dtype)
    q_out, k_out = rotary_embedding(q, k, cos, sin)
    assert torch.equal(q_out, q) and torch.equal(k_out, k)


def test_reference_is_the_engine_apply_rotary():
    # The reference is the spec of the fused path: op for op the engine's torch path.
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(5, 3, 16).to(dtype)
        cos, sin = RotaryEmbedding(16, 10000.0, {}, "cpu").cos_sin(torch.arange(5) * 13, dtype)
        assert torch.equal(apply_rotary_reference(x, cos, sin), apply_rotary(x, cos, sin))


def test_rotate_qk_fused_flag(case):
    q, k, cos, sin = _inputs(case)
    fused = rotate_qk(q, k, cos, sin, fused=True)
    plain = rotate_qk(q, k, cos, sin)
    assert torch.equal(plain[0], apply_rotary(q, cos, sin)) and torch.equal(plain[1], apply_rotary(k, cos, sin))
    _close(fused[0], plain[0], case)
    _close(fused[1], plain[1], case)


def test_empty_batch(case):
    q, k, cos, sin = _inputs(case, t=0)
    q_out, k_out = rotary_embedding(q, k, cos, sin)
    assert q_out.shape == (0, 4, 16) and k_out.shape == (0, 2, 16)


def _other_dtype(t):
    return t.float() if t.dtype != torch.float32 else t.half()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update(k=_other_dtype(a["k"])), "k has dtype"),
        (lambda a: a.update(cos=_other_dtype(a["cos"])), "cos has dtype"),
        (lambda a: a.update(k=a["k"][:, :, :8]), "k has shape"),
        (lambda a: a.update(k=a["k"][:-1]), "k has shape"),
        (lambda a: a.update(cos=a["cos"][:, 0]), "cos has shape"),
        (lambda a: a.update(sin=a["sin"][:-1]), "sin has shape"),
        (lambda a: a.update(q=a["q"].flatten(1)), "q has shape"),
        (lambda a: a.update(q=a["q"][..., :15], k=a["k"][..., :15]), "head_dim must be even"),
        (lambda a: a.update(q=a["q"].transpose(1, 2).contiguous().transpose(1, 2)), "q must be contiguous"),
        (lambda a: a.update(q=a["q"].int(), k=a["k"].int()), "q has dtype"),
    ],
)
def test_bad_arguments_raise_value_error(case, mutate, message):
    q, k, cos, sin = _inputs(case)
    args = {"q": q, "k": k, "cos": cos, "sin": sin}
    mutate(args)
    with pytest.raises(ValueError, match=message):
        rotary_embedding(args["q"], args["k"], args["cos"], args["sin"])


def test_cpu_tensors_without_interpreter_are_refused(compiled_mode_on_cpu):
    q = torch.zeros(1, 2, 8)
    cos = torch.ones(1, 1, 4)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        rotary_embedding(q, q.clone(), cos, torch.zeros_like(cos))
