"""Our LoRA and DoRA qkv layers against peft's reference, and DoRA in the PEMMA network (tiny tensors, CPU).

peft adapts separate Q and V projections; MONAI's attention has one fused qkv layer. Holding the fused layer's
thirds in separate ``nn.Linear`` layers and copying our factors into peft's adapters must give the same outputs
and gradients, which pins our fused implementation to peft's (incl. DoRA's detached weight norm).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, inject_adapter_in_model

from networks_helpers import ATTENTION_LAYERS, CLASSES, Tiny, adaptation_sizes
from nnunetv2_pemma.adaptation.layers import LoRAQKVLinear, set_adapters_enabled
from nnunetv2_pemma.adaptation.methods import DORA, LORA, get_method, is_added, train_only
from nnunetv2_pemma.errors import PlansError
from nnunetv2_pemma.plans import load_preset

D_IN, D, RANK, ALPHA = 20, 24, 4, 8  # scaling 2, so a wrong scaling cannot pass
SECTION = dataclasses.replace(load_preset("tiny").adaptation, lora_rank=RANK, lora_alpha=ALPHA)
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
        use_dora=ours.use_dora,
        lora_dropout=0.0,
    )
    ref = inject_adapter_in_model(config, SeparateQKV(ours))
    if copy_adapters:
        with torch.no_grad():
            for part in "qv":
                layer = getattr(ref, part)
                layer.lora_A["default"].weight.copy_(getattr(ours, f"lora_A_{part}"))
                layer.lora_B["default"].weight.copy_(getattr(ours, f"lora_B_{part}"))
                if ours.use_dora:
                    layer.lora_magnitude_vector["default"].weight.copy_(getattr(ours, f"lora_magnitude_{part}"))
    ref.requires_grad_(True)
    return ref


def ours_trained(method: str, bias: bool) -> LoRAQKVLinear:
    """Our layer with non-trivial factors and magnitudes, as after some training."""
    layer = get_method(method).wrap_qkv(nn.Linear(D_IN, 3 * D, bias=bias), SECTION)
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
    ours = DORA.wrap_qkv(nn.Linear(D_IN, 3 * D), SECTION)
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


# --- the layer on its own -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "bias"), METHODS_AND_BIAS)
def test_layer_is_the_base_at_init_and_when_disabled(method, bias):
    base = nn.Linear(D_IN, 3 * D, bias=bias)
    layer = get_method(method).wrap_qkv(base, SECTION)
    assert type(layer) is LoRAQKVLinear and layer.use_dora == (method == "dora")
    assert layer.weight is base.weight and layer.bias is base.bias and layer.scaling == 2.0
    added = {"lora_A_q", "lora_B_q", "lora_A_v", "lora_B_v"}
    added |= {"lora_magnitude_q", "lora_magnitude_v"} if method == "dora" else set()
    assert {n for n, _ in layer.named_parameters()} == added | {"weight"} | ({"bias"} if bias else set())
    assert layer.lora_A_q.shape == (RANK, D_IN) and layer.lora_B_v.shape == (D, RANK)
    assert layer.lora_A_q.abs().sum() > 0 and layer.lora_B_q.abs().sum() == 0
    if method == "dora":
        assert layer.lora_magnitude_q.shape == layer.lora_magnitude_v.shape == (D,)
        torch.testing.assert_close(layer.lora_magnitude_v, base.weight[2 * D :].norm(dim=1))
    result = nn.Linear(D_IN, 3 * D, bias=bias).load_state_dict(layer.state_dict(), strict=False)
    assert sorted(result.unexpected_keys) == sorted(added) and not result.missing_keys

    x = torch.randn(2, 7, D_IN)
    with torch.no_grad():
        ref = base(x)
        assert torch.equal(layer(x), ref)  # B = 0 (and DoRA: m = ||W||): exactly the base
        layer.lora_B_q.normal_()
        if method == "dora":
            layer.lora_magnitude_v.mul_(2)
        else:
            layer.lora_B_v.normal_()
        out = layer(x)
        assert torch.equal(out[..., D : 2 * D], ref[..., D : 2 * D])  # K untouched
        q, v = slice(0, D), slice(2 * D, 3 * D)
        assert not torch.allclose(out[..., q], ref[..., q]) and not torch.allclose(out[..., v], ref[..., v])
        layer.enabled = False
        assert torch.equal(layer(x), ref) and layer.merged_weight() is layer.weight


def test_layer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="3 \\* d"):
        LoRAQKVLinear(nn.Linear(D_IN, 100), rank=RANK, alpha=ALPHA)
    with pytest.raises(ValueError, match="rank"):
        LoRAQKVLinear(nn.Linear(D_IN, 3 * D), rank=0, alpha=ALPHA)
    for method in (LORA, DORA):  # wrapping an adapter again would silently drop its factors
        with pytest.raises(ValueError, match="plain fused qkv nn.Linear, got LoRAQKVLinear"):
            method.wrap_qkv(DORA.wrap_qkv(nn.Linear(D_IN, 3 * D), SECTION), SECTION)


def test_registry_wraps_qkv_with_lora_or_dora():
    with pytest.raises(PlansError, match="'ia3'"):
        get_method("ia3")
    assert get_method("lora") is LORA and get_method("dora") is DORA
    lora, dora = (m.wrap_qkv(nn.Linear(D_IN, 3 * D), SECTION) for m in (LORA, DORA))
    assert type(lora) is LoRAQKVLinear and not lora.use_dora
    assert type(dora) is LoRAQKVLinear and dora.use_dora


# --- PEMMA networks with DoRA -----------------------------------------------------------------------------------


def test_pemma_unetr_with_dora_trains_only_added_parameters():
    tiny = Tiny.of("tiny_dora")
    net = tiny.adapted(tiny.base())
    qkv = [layer.qkv for layer in net.attention_layers()]
    assert len(qkv) == ATTENTION_LAYERS["UNETR"] and all(isinstance(q, LoRAQKVLinear) and q.use_dora for q in qkv)

    trainable = train_only(net, "adaptation")
    magnitudes = [n for n in trainable if "lora_magnitude" in n]
    assert len(magnitudes) == 12 * 2 and all(is_added(n) for n in trainable)
    net.train()
    target = torch.randint(0, CLASSES, (1, *tiny.img))
    nn.functional.cross_entropy(net(tiny.image(2, batch=1)), target).backward()
    named = dict(net.named_parameters())
    assert all(p.grad is None for n, p in named.items() if not is_added(n))
    assert all(named[n].grad is not None for n in trainable)
    assert set(magnitudes) <= set(train_only(net, "continual"))

    set_adapters_enabled(net, False)
    assert not any(layer.enabled for layer in qkv)


def test_paper_dora_trainable_parameter_count():
    counts = {name: adaptation_sizes(preset, with_base=False) for name, preset in (("lora", "paper"),
                                                                                   ("dora", "paper_dora"))}
    lora, dora = counts["lora"].preset, counts["dora"].preset
    assert dora.model == lora.model and dora.patch_size == lora.patch_size
    assert dora.adaptation.method == "dora" and lora.adaptation.method == "lora"
    assert dataclasses.replace(dora.adaptation, method="lora") == lora.adaptation
    magnitudes = 12 * 2 * lora.model.hidden_size  # 12 blocks, Q and V, one per output feature
    print(f"\nPEMMA UNETR-B {lora.patch_size} trainable: LoRA {counts['lora'].trainable:,}, DoRA "
          f"{counts['dora'].trainable:,} (+{magnitudes:,} magnitudes); total DoRA {counts['dora'].total:,}")
    assert counts["dora"].trainable == counts["lora"].trainable + magnitudes
    assert counts["dora"].total == counts["lora"].total + magnitudes
    assert counts["dora"].parts["lora_"] == counts["lora"].parts["lora_"] + magnitudes
