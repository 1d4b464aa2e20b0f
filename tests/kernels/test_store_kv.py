"""store_kv (Triton) against store_kv_reference, and its argument checks."""

from __future__ import annotations

import pytest
import torch

from kernels.store_kv import store_kv, store_kv_reference


def _inputs(case, t=11, nb=6, bs=4, h_kv=2, d=8):
    dev, dt = case.device, case.dtype
    # A fused QKV projection output: K and V are strided views, not contiguous tensors.
    qkv = torch.randn(t, (4 + 2 * h_kv) * d, device=dev, dtype=dt)
    k = qkv[:, 4 * d : (4 + h_kv) * d].view(t, h_kv, d)
    v = qkv[:, (4 + h_kv) * d :].view(t, h_kv, d)
    slots = torch.randperm(nb * bs, device=dev)[:t]
    if t > 3:
        slots[3] = -1  # a padding token: must not be written anywhere
    k_cache = torch.zeros(nb, bs, h_kv, d, device=dev, dtype=dt)
    return k, v, k_cache, torch.zeros_like(k_cache), slots


def test_store_matches_reference(case):
    k, v, kc, vc, slots = _inputs(case)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    store_kv(k, v, kc, vc, slots)
    store_kv_reference(k, v, kc_ref, vc_ref, slots)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    # Every kept token landed in its slot; the padding token left nothing behind.
    flat = kc.view(-1, *kc.shape[2:])
    keep = slots >= 0
    assert torch.equal(flat[slots[keep]], k[keep])
    assert int((flat.abs().sum((1, 2)) != 0).sum()) == int(keep.sum())


def test_empty_batch_is_a_no_op(case):
    k, v, kc, vc, slots = _inputs(case, t=0)
    store_kv(k, v, kc, vc, slots)
    assert not kc.any()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update(slots=a["slots"].int()), "slot_mapping has dtype"),
        (lambda a: a.update(v=a["v"].float() if a["v"].dtype != torch.float32 else a["v"].half()), "v has dtype"),
        (lambda a: a.update(k=a["k"][:, :1]), "k has shape"),
        (lambda a: a.update(kc=a["kc"].transpose(0, 1)), "v_cache has shape"),
        (lambda a: a.update(k=a["k"].transpose(1, 2).contiguous().transpose(1, 2)), "contiguous"),
    ],
)
def test_bad_arguments_raise_value_error(case, mutate, message):
    k, v, kc, vc, slots = _inputs(case)
    args = dict(k=k, v=v, kc=kc, vc=vc, slots=slots)
    mutate(args)
    with pytest.raises(ValueError, match=message):
        store_kv(args["k"], args["v"], args["kc"], args["vc"], args["slots"])


def test_cpu_tensors_without_interpreter_are_refused(compiled_mode_on_cpu):
    k = torch.zeros(1, 1, 8)
    cache = torch.zeros(1, 4, 1, 8)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        store_kv(k, k, cache, cache.clone(), torch.zeros(1, dtype=torch.int64))
