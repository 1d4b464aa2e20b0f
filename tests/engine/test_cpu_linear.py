"""CPU linear kernels (engine.models.cpu_linear / linear_setup): same model whatever the kernel,
one copy of the weights, a tied embedding that survives packing, and a clean fallback."""

from __future__ import annotations

import logging

import pytest
import torch

import engine.models.linear_setup as linear_setup
from engine.models import ModelConfig, build_model
from engine.models.cpu_linear import onednn_unavailable_reason, pick
from engine.models.linear_setup import setup_cpu_linears
from tests.engine.tiny_models import tiny_config

CPU = torch.device("cpu")
needs_onednn = pytest.mark.skipif(
    onednn_unavailable_reason(torch.float32) is not None, reason="this torch has no prepacked oneDNN linear"
)


_STATES: dict[str, dict[str, torch.Tensor]] = {}


def _model(arch: str):
    """Our tiny ``arch`` model, loaded from the same random HF weights at every call."""
    from transformers import AutoModelForCausalLM

    hf_cfg = tiny_config(arch)
    if arch not in _STATES:
        _STATES[arch] = dict(AutoModelForCausalLM.from_config(hf_cfg).state_dict())
    state = _STATES[arch]
    model = build_model(ModelConfig.from_hf_config(hf_cfg))
    model.load_weights(state.items())
    return model, state


@torch.inference_mode()
def _outputs(model) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, model.config.hidden_size, generator=g)
    layer = model.model.layers[1]
    ids = torch.tensor([1, 2, 300])
    return [
        model.compute_logits(hidden),
        layer.mlp(hidden),
        layer.self_attn.qkv_proj(hidden),
        model.model.embed_tokens(ids),
    ]


@pytest.mark.parametrize("arch", ["tied", "qwen2"])  # tied embeddings; qkv biases
@pytest.mark.parametrize("kind", ["onednn", "dense_t"])
def test_every_kernel_gives_the_same_model(arch: str, kind: str) -> None:
    if kind == "onednn" and onednn_unavailable_reason(torch.float32):
        pytest.skip("this torch has no prepacked oneDNN linear")
    dense, state = _model(arch)
    other, _ = _model(arch)
    other.use_linear_kernels(dict.fromkeys(other.linears(), kind))
    assert {m.kernel for m in other.linears()} == {kind}
    for a, b in zip(_outputs(dense), _outputs(other)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ids = torch.tensor([3, 0, 319])
    assert torch.equal(other.model.embed_tokens(ids), state["model.embed_tokens.weight"][ids])


@needs_onednn
def test_onednn_keeps_one_copy_and_the_tied_table() -> None:
    model, state = _model("tied")
    plan = setup_cpu_linears(model, "onednn", CPU)
    assert plan.kernels == {"onednn": len(model.linears())}
    # Every dense weight is gone from the linears; the only dense (V, hidden) matrix left
    # is the embedding's, sharing the storage the checkpoint was loaded into.
    assert all(m.weight is None and m.packed is not None for m in model.linears())
    names = [n for n, _ in model.named_parameters()]
    assert "model.embed_tokens.weight" in names and not any(n.endswith("proj.weight") for n in names)
    assert torch.equal(model.model.embed_tokens.table(), state["model.embed_tokens.weight"])
    with pytest.raises(ValueError, match="packed"):
        model.lm_head.out_weight()


def test_auto_times_every_shape_and_picks_a_candidate(caplog: pytest.LogCaptureFixture) -> None:
    model, _ = _model("qwen2")
    dense, _ = _model("qwen2")
    with caplog.at_level(logging.INFO, logger="engine.models.linear_setup"):
        plan = setup_cpu_linears(model, "auto", CPU, max_num_seqs=4, max_num_batched_tokens=32)
    # qkv, o, gate_up, down and the lm_head: five shapes, each timed at M = 1, 4 (and 32).
    assert len(plan.shapes) == 5
    for shape in plan.shapes:
        sizes = {m for per_m in shape.ms.values() for m in per_m}
        assert sizes == ({1, 4} if shape.out_features == model.config.vocab_size else {1, 4, 32})
        assert shape.choice == pick(shape.ms)
    assert sum(plan.kernels.values()) == len(model.linears())
    assert "cpu_linear=auto" in caplog.text and "->" in caplog.text  # the choice is logged
    for a, b in zip(_outputs(dense), _outputs(model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_over_budget_the_untimed_shapes_take_the_most_common_winner(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linear_setup, "CALIBRATION_BUDGET_S", 0.0)
    model, _ = _model("qwen2")
    plan = setup_cpu_linears(model, "auto", CPU, max_num_seqs=2, max_num_batched_tokens=8)
    assert len(plan.shapes) == 1 and len(plan.untimed) == 4  # the largest shape only
    assert set(plan.kernels) == {plan.shapes[0].choice} and "budget" in plan.summary()


def test_without_onednn_auto_falls_back_and_onednn_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linear_setup, "onednn_unavailable_reason", lambda dtype: "no mkldnn in this build")
    model, _ = _model("tied")
    plan = setup_cpu_linears(model, "auto", CPU, max_num_seqs=2, max_num_batched_tokens=8)
    assert "onednn" not in plan.kernels and "no mkldnn" in plan.note
    with pytest.raises(ValueError, match="cpu_linear='onednn' cannot run: no mkldnn.*'auto' or 'dense'"):
        setup_cpu_linears(_model("tied")[0], "onednn", CPU)


def test_dense_and_cuda_leave_the_checkpoint_layout_alone() -> None:
    for setting, device in (("dense", CPU), ("onednn", torch.device("cuda")), ("auto", torch.device("cuda"))):
        model, _ = _model("tied")
        plan = setup_cpu_linears(model, setting, device)
        assert plan.kernels == {"dense": len(model.linears())} and not plan.shapes
        assert model.model.embed_tokens.tied_head is model.lm_head  # still one shared matrix


def test_pick_weighs_batch_sizes_relatively() -> None:
    # dense wins the prefill M by 10 ms, onednn wins both decode sizes by 2x: onednn.
    ms = {"onednn": {1: 0.1, 16: 1.0, 256: 60.0}, "dense": {1: 0.2, 16: 2.0, 256: 50.0}}
    assert pick(ms) == "onednn"
    ms["dense"] = {1: 0.1, 16: 1.1, 256: 50.0}
    assert pick(ms) == "dense"
