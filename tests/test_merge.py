"""merge_lora_for_inference: LoRA / DoRA folded into plain qkv layers give the same outputs and base names."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from nnunetv2_pemma.networks.lora import DoRAQKVLinear, LoRAQKVLinear, set_lora_enabled
from nnunetv2_pemma.networks.merge import merge_lora_for_inference
from nnunetv2_pemma.networks.pemma_unetr import PEMMAUNETR, is_pemma_parameter

TINY = json.loads((Path(__file__).resolve().parents[1] / "plans" / "tiny.json").read_text())
IMG = (32, 32, 32)
CLASSES = 3


def trained_pemma(method: str, modalities=("CT", "PET"), qkv_bias: bool = False) -> PEMMAUNETR:
    """A tiny PEMMA network whose adapters moved away from their (identity) initialisation, as after training."""
    model = {**TINY["model"], "qkv_bias": qkv_bias}
    net = PEMMAUNETR(model, {**TINY["adaptation"], "method": method}, CLASSES, IMG, modalities).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
            elif "lora_magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("qkv.bias"):
                p.normal_(std=0.1)
    return net


@pytest.mark.parametrize("method,layer_type", [("lora", LoRAQKVLinear), ("dora", DoRAQKVLinear)])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_merge_keeps_outputs_and_base_names(method, layer_type, qkv_bias):
    net = trained_pemma(method, qkv_bias=qkv_bias)
    assert sum(type(m) is layer_type for m in net.modules()) == 12
    x = torch.randn(2, 2, *IMG)
    with torch.no_grad():
        reference = net(x)
    before = {k: v.clone() for k, v in net.state_dict().items()}

    merged = merge_lora_for_inference(net)

    assert merged is net
    assert not any(isinstance(m, LoRAQKVLinear) for m in net.modules())
    qkv = [m for name, m in net.named_modules() if name.endswith("attn.qkv")]
    assert len(qkv) == 12 and all(type(m) is nn.Linear for m in qkv)
    with torch.no_grad():
        out = net(x)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)

    after = net.state_dict()
    base_keys = [k for k in before if not is_pemma_parameter(k)]
    assert list(after) == [k for k in before if "lora_" not in k]  # same names, same order, adapters gone
    for k in base_keys:
        assert after[k].shape == before[k].shape
        if not k.endswith("qkv.weight"):
            assert torch.equal(after[k], before[k]), k
    # the adapters really moved Q and V: the merged weights differ from the base ones there, never on K
    w_before, w_after = before["vit.blocks.0.attn.qkv.weight"], after["vit.blocks.0.attn.qkv.weight"]
    d = w_before.shape[0] // 3
    assert torch.equal(w_after[d : 2 * d], w_before[d : 2 * d])
    assert not torch.allclose(w_after[:d], w_before[:d]) and not torch.allclose(w_after[2 * d :], w_before[2 * d :])


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_ct_only_input(method):
    """The flexible-modality path (CT only, PET a zero image) gives the same result merged."""
    net = trained_pemma(method, modalities=("CT",))
    x = torch.randn(1, 1, *IMG)
    with torch.no_grad():
        reference = net(x)
        out = merge_lora_for_inference(net)(x)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)


def test_merge_of_disabled_adapters_is_the_base_network():
    net = trained_pemma("lora")
    set_lora_enabled(net, False)
    x = torch.randn(1, 2, *IMG)
    base_weights = {k: v.clone() for k, v in net.state_dict().items() if k.endswith("qkv.weight")}
    with torch.no_grad():
        reference = net(x)
        out = merge_lora_for_inference(net)(x)
    assert torch.equal(out, reference)
    for k, v in base_weights.items():
        assert torch.equal(net.state_dict()[k], v)


def test_merge_keeps_requires_grad_training_mode_and_independence_of_a_copy():
    net = trained_pemma("lora").train()
    for name, p in net.named_parameters():
        p.requires_grad_(is_pemma_parameter(name))  # adaptation: base frozen
    original = copy.deepcopy(net)
    merge_lora_for_inference(net)
    qkv = net.vit.blocks[0].attn.qkv
    assert qkv.training and not qkv.weight.requires_grad
    # the original (not merged) keeps its adapters and its base weights
    assert isinstance(original.vit.blocks[0].attn.qkv, LoRAQKVLinear)
    assert not torch.equal(original.vit.blocks[0].attn.qkv.weight, qkv.weight)


def test_merge_without_adapters_is_a_no_op():
    net = nn.Sequential(nn.Linear(4, 12))
    assert merge_lora_for_inference(net) is net and type(net[0]) is nn.Linear


def test_merge_rejects_a_bare_lora_layer():
    with pytest.raises(TypeError, match="merged_weight"):
        merge_lora_for_inference(LoRAQKVLinear(nn.Linear(8, 24), rank=2, alpha=2))
