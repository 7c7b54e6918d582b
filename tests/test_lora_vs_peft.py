"""Our LoRA and DoRA qkv layers against peft's reference, and DoRA in the PEMMA network (tiny tensors, CPU).

peft adapts separate Q and V projections; MONAI's attention has one fused qkv layer. Holding the fused layer's
thirds in separate ``nn.Linear`` layers and copying our factors into peft's adapters must give the same outputs
and gradients, which pins our fused implementation to peft's (incl. DoRA's detached weight norm).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, inject_adapter_in_model

from nnunetv2_pemma.networks import (
    PEMMAUNETR,
    DoRAQKVLinear,
    LoRAQKVLinear,
    build_unetr,
    count_parameters,
    freeze_for_adaptation,
    freeze_for_continual,
    is_pemma_parameter,
    set_lora_enabled,
    wrap_qkv,
)

PLANS = Path(__file__).resolve().parents[1] / "plans"
TINY_DORA = json.loads((PLANS / "tiny_dora.json").read_text())
PAPER = json.loads((PLANS / "paper.json").read_text())
PAPER_DORA = json.loads((PLANS / "paper_dora.json").read_text())
D_IN, D, RANK, ALPHA = 20, 24, 4, 8  # scaling 2, so a wrong scaling cannot pass
IMG = (32, 32, 32)
CLASSES = 3
METHODS_AND_BIAS = [(m, b) for m in ("lora", "dora") for b in (False, True)]


class SeparateQKV(nn.Module):
    """peft's view of a fused qkv layer: Q, K and V projections holding its thirds; output ``[q | k | v]``."""

    def __init__(self, fused: nn.Linear) -> None:
        super().__init__()
        weights = fused.weight.detach().chunk(3)
        biases = fused.bias.detach().chunk(3) if fused.bias is not None else (None,) * 3
        for name, w, b in zip("qkv", weights, biases):
            layer = nn.Linear(fused.in_features, w.shape[0], bias=b is not None)
            with torch.no_grad():
                layer.weight.copy_(w)
                if b is not None:
                    layer.bias.copy_(b)
            setattr(self, name, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.q(x), self.k(x), self.v(x)), dim=-1)


def peft_reference(ours: LoRAQKVLinear, copy_adapters: bool = True) -> SeparateQKV:
    """peft on Q and V of the base of ``ours``, with our A, B (and magnitudes) copied in; every parameter trains."""
    config = LoraConfig(
        r=ours.rank,
        lora_alpha=ours.alpha,
        target_modules=["q", "v"],
        use_dora=isinstance(ours, DoRAQKVLinear),
        lora_dropout=0.0,
    )
    ref = inject_adapter_in_model(config, SeparateQKV(ours))
    if copy_adapters:
        with torch.no_grad():
            for part in "qv":
                layer = getattr(ref, part)
                layer.lora_A["default"].weight.copy_(getattr(ours, f"lora_A_{part}"))
                layer.lora_B["default"].weight.copy_(getattr(ours, f"lora_B_{part}"))
                if isinstance(ours, DoRAQKVLinear):
                    layer.lora_magnitude_vector["default"].weight.copy_(getattr(ours, f"lora_magnitude_{part}"))
    ref.requires_grad_(True)
    return ref


def ours_trained(method: str, bias: bool) -> LoRAQKVLinear:
    """Our layer with non-trivial factors and magnitudes, as after some training."""
    layer = wrap_qkv(nn.Linear(D_IN, 3 * D, bias=bias), RANK, ALPHA, method)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
            elif "lora_magnitude" in name:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    return layer


def grad_dict(loss: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradients of ``loss`` w.r.t. ``tensors``, by the same names."""
    return dict(zip(tensors, torch.autograd.grad(loss, list(tensors.values()))))


# --- equality with peft -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "bias"), METHODS_AND_BIAS)
def test_outputs_and_gradients_equal_peft(method, bias):
    ours = ours_trained(method, bias)
    ref = peft_reference(ours)
    x = torch.randn(2, 7, D_IN, requires_grad=True)
    out, ref_out = ours(x), ref(x)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-6)

    # the same parameters on both sides: our fused base weight (and bias) are peft's Q, K, V ones concatenated
    ref_adapters = {}
    for part in "qv":
        layer = getattr(ref, part)
        ref_adapters[f"lora_A_{part}"] = layer.lora_A["default"].weight
        ref_adapters[f"lora_B_{part}"] = layer.lora_B["default"].weight
        if method == "dora":
            ref_adapters[f"lora_magnitude_{part}"] = layer.lora_magnitude_vector["default"].weight
    base_names = ["weight", "bias"] if bias else ["weight"]
    params = dict(ours.named_parameters())
    ref_params = {"x": x, **ref_adapters}
    for name in base_names:
        for part, layer in zip("qkv", (ref.q.base_layer, ref.k, ref.v.base_layer)):
            ref_params[f"{name}_{part}"] = getattr(layer, name)
    cotangent = torch.randn_like(out)
    got = grad_dict((out * cotangent).sum(), {"x": x, **{n: params[n] for n in [*ref_adapters, *base_names]}})
    want = grad_dict((ref_out * cotangent).sum(), ref_params)
    for name in base_names:
        want[name] = torch.cat([want.pop(f"{name}_{part}") for part in "qkv"])
    assert got.keys() == want.keys()
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"grad of {n}: {m}")


def test_dora_magnitudes_are_initialised_as_peft():
    ours = wrap_qkv(nn.Linear(D_IN, 3 * D), RANK, ALPHA, "dora")
    ref = peft_reference(ours, copy_adapters=False)  # peft's own init: norms of the base Q and V rows
    torch.testing.assert_close(ours.lora_magnitude_q, ref.q.lora_magnitude_vector["default"].weight)
    torch.testing.assert_close(ours.lora_magnitude_v, ref.v.lora_magnitude_vector["default"].weight)


@pytest.mark.parametrize(("method", "bias"), METHODS_AND_BIAS)
def test_merged_weight_matches_forward_and_peft_merge(method, bias):
    ours = ours_trained(method, bias)
    ref = peft_reference(ours)
    x = torch.randn(2, 7, D_IN)
    with torch.no_grad():
        merged = ours.merged_weight()
        torch.testing.assert_close(nn.functional.linear(x, merged, ours.bias), ours(x))
        ref.q.merge()
        ref.v.merge()
        peft_merged = torch.cat((ref.q.base_layer.weight, ref.k.weight, ref.v.base_layer.weight))
    torch.testing.assert_close(merged, peft_merged)


# --- DoRA layer ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_dora_equals_base_at_init_and_when_disabled(bias):
    base = nn.Linear(D_IN, 3 * D, bias=bias)
    dora = wrap_qkv(base, RANK, ALPHA, "dora")
    assert isinstance(dora, DoRAQKVLinear) and dora.weight is base.weight and dora.bias is base.bias
    expected = {"weight", "lora_A_q", "lora_B_q", "lora_A_v", "lora_B_v", "lora_magnitude_q", "lora_magnitude_v"}
    assert {n for n, _ in dora.named_parameters()} == expected | ({"bias"} if bias else set())
    assert dora.lora_magnitude_q.shape == dora.lora_magnitude_v.shape == (D,)
    torch.testing.assert_close(dora.lora_magnitude_v, base.weight[2 * D :].norm(dim=1))

    x = torch.randn(2, 7, D_IN)
    with torch.no_grad():
        assert torch.equal(dora(x), base(x))  # B = 0 and m = ||W||: exactly the base
        dora.lora_B_q.normal_()
        dora.lora_magnitude_v.mul_(2)
        out = dora(x)
        assert torch.equal(out[..., D : 2 * D], base(x)[..., D : 2 * D])  # K untouched
        assert not torch.allclose(out, base(x))
        dora.enabled = False
        assert torch.equal(dora(x), base(x)) and dora.merged_weight() is dora.weight


def test_wrap_qkv_rejects_bad_arguments():
    with pytest.raises(ValueError, match="'ia3'"):
        wrap_qkv(nn.Linear(D_IN, 3 * D), RANK, ALPHA, "ia3")
    with pytest.raises(ValueError, match="DoRAQKVLinear"):
        wrap_qkv(wrap_qkv(nn.Linear(D_IN, 3 * D), RANK, ALPHA, "dora"), RANK, ALPHA, "lora")
    assert type(wrap_qkv(nn.Linear(D_IN, 3 * D), RANK, ALPHA)) is LoRAQKVLinear


# --- PEMMAUNETR with DoRA -----------------------------------------------------------------------------------


def test_pemma_unetr_with_dora_trains_only_pemma_parameters():
    base = build_unetr(TINY_DORA["model"], 1, CLASSES, IMG)
    net = PEMMAUNETR(TINY_DORA["model"], TINY_DORA["adaptation"], CLASSES, IMG)
    net.load_base_state_dict(base.state_dict())
    qkv = [blk.attn.qkv for blk in net.vit.blocks]
    assert all(isinstance(layer, DoRAQKVLinear) for layer in qkv)

    trainable = freeze_for_adaptation(net)
    magnitudes = [n for n in trainable if "lora_magnitude" in n]
    assert len(magnitudes) == 12 * 2 and all(is_pemma_parameter(n) for n in trainable)
    net.train()
    target = torch.randint(0, CLASSES, (1, *IMG))
    nn.functional.cross_entropy(net(torch.randn(1, 2, *IMG)), target).backward()
    named = dict(net.named_parameters())
    assert all(p.grad is None for n, p in named.items() if not is_pemma_parameter(n))
    assert all(named[n].grad is not None for n in trainable)
    assert set(magnitudes) <= set(freeze_for_continual(net))

    set_lora_enabled(net, False)
    assert not any(layer.enabled for layer in qkv)


def test_pemma_unetr_rejects_unknown_method():
    with pytest.raises(ValueError, match="'vera'"):
        PEMMAUNETR(TINY_DORA["model"], {**TINY_DORA["adaptation"], "method": "vera"}, CLASSES, IMG)


def test_paper_dora_trainable_parameter_count():
    img = tuple(PAPER_DORA["patch_size"])
    assert PAPER_DORA["model"] == PAPER["model"] and img == tuple(PAPER["patch_size"])
    assert {**PAPER_DORA["adaptation"], "method": "lora"} == {**PAPER["adaptation"], "method": "lora"}
    counts = {}
    for name, preset in (("lora", PAPER), ("dora", PAPER_DORA)):
        net = PEMMAUNETR(preset["model"], preset["adaptation"], CLASSES, img)
        freeze_for_adaptation(net)
        counts[name] = count_parameters(net)
    hidden = PAPER["model"]["hidden_size"]
    magnitudes = 12 * 2 * hidden  # 12 blocks, Q and V, one per output feature
    print(f"\nPEMMA UNETR-B {img} trainable: LoRA {counts['lora'][1]:,}, DoRA {counts['dora'][1]:,} "
          f"(+{magnitudes:,} magnitudes); total DoRA {counts['dora'][0]:,}")
    assert counts["dora"][1] == counts["lora"][1] + magnitudes
    assert counts["dora"][0] == counts["lora"][0] + magnitudes
