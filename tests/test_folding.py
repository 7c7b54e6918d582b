"""fold_adapters: LoRA / DoRA folded into plain qkv layers give the same outputs and base names."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from networks_helpers import ATTENTION_LAYERS, Tiny, perturb
from nnunetv2_pemma.adaptation.folding import fold_adapters
from nnunetv2_pemma.adaptation.layers import LoRAQKVLinear, set_adapters_enabled
from nnunetv2_pemma.adaptation.methods import is_added
from nnunetv2_pemma.networks.modality_slots import ModalitySlots


def trained_pemma(method: str, modalities=("CT", "PET"), qkv_bias: bool = False, backbone: str = "UNETR"
                  ) -> tuple[Tiny, ModalitySlots]:
    """A tiny PEMMA network whose adapters moved away from their (identity) initialisation, as after training."""
    tiny = Tiny.of(backbone).with_model(qkv_bias=qkv_bias)
    net = tiny.pemma(modalities, method=method)
    perturb(net, "lora_B", "qkv.bias", std=0.1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    return tiny, net


@pytest.mark.parametrize("backbone", ["UNETR", "SwinUNETR"])
@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_fold_keeps_outputs_and_base_names(backbone, method, qkv_bias):
    tiny, net = trained_pemma(method, qkv_bias=qkv_bias, backbone=backbone)
    layers = [m for m in net.modules() if type(m) is LoRAQKVLinear and m.use_dora == (method == "dora")]
    assert len(layers) == ATTENTION_LAYERS[backbone]
    first_qkv = next(name for name, m in net.named_modules() if m is layers[0]) + ".weight"
    x = tiny.image(2)
    with torch.no_grad():
        reference = net(x)
    before = {k: v.clone() for k, v in net.state_dict().items()}

    folded = fold_adapters(net)

    assert folded is net
    assert not any(isinstance(m, LoRAQKVLinear) for m in net.modules())
    qkv = [m for name, m in net.named_modules() if name.endswith("attn.qkv")]
    assert len(qkv) == ATTENTION_LAYERS[backbone] and all(type(m) is nn.Linear for m in qkv)
    with torch.no_grad():
        out = net(x)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)

    after = net.state_dict()
    base_keys = [k for k in before if not is_added(k)]
    assert list(after) == [k for k in before if "lora_" not in k]  # same names, same order, adapters gone
    for k in base_keys:
        assert after[k].shape == before[k].shape
        if not k.endswith("qkv.weight"):
            assert torch.equal(after[k], before[k]), k
    # the adapters really moved Q and V: the folded weights differ from the base ones there, never on K
    w_before, w_after = before[first_qkv], after[first_qkv]
    d = w_before.shape[0] // 3
    assert torch.equal(w_after[d : 2 * d], w_before[d : 2 * d])
    assert not torch.allclose(w_after[:d], w_before[:d]) and not torch.allclose(w_after[2 * d :], w_before[2 * d :])


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_fold_ct_only_input(method):
    """The flexible-modality path (CT only, PET a zero image) gives the same result folded."""
    tiny, net = trained_pemma(method, modalities=("CT",))
    x = tiny.image(1, batch=1)
    with torch.no_grad():
        reference = net(x)
        out = fold_adapters(net)(x)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)


def test_fold_of_disabled_adapters_is_the_base_network():
    tiny, net = trained_pemma("lora")
    set_adapters_enabled(net, False)
    x = tiny.image(2, batch=1)
    base_weights = {k: v.clone() for k, v in net.state_dict().items() if k.endswith("qkv.weight")}
    with torch.no_grad():
        reference = net(x)
        out = fold_adapters(net)(x)
    assert torch.equal(out, reference)
    for k, v in base_weights.items():
        assert torch.equal(net.state_dict()[k], v)


def test_fold_keeps_requires_grad_training_mode_and_independence_of_a_copy():
    _, net = trained_pemma("lora")
    net.train()
    for name, p in net.named_parameters():
        p.requires_grad_(is_added(name))  # adaptation: base frozen
    original = copy.deepcopy(net)
    fold_adapters(net)
    qkv = net.vit.blocks[0].attn.qkv
    assert qkv.training and not qkv.weight.requires_grad
    # the original (not folded) keeps its adapters and its base weights
    assert isinstance(original.vit.blocks[0].attn.qkv, LoRAQKVLinear)
    assert not torch.equal(original.vit.blocks[0].attn.qkv.weight, qkv.weight)


def test_fold_without_adapters_is_a_no_op():
    net = nn.Sequential(nn.Linear(4, 12))
    assert fold_adapters(net) is net and type(net[0]) is nn.Linear


def test_fold_rejects_a_bare_lora_layer():
    with pytest.raises(TypeError, match="merged_weight"):
        fold_adapters(LoRAQKVLinear(nn.Linear(8, 24), rank=2, alpha=2))
