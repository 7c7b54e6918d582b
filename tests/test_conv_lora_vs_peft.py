"""LoRA around a frozen convolution against peft's ``lora.Conv2d`` / ``lora.Conv3d``: same outputs and gradients
for anisotropic kernels and strided convolutions, a fresh layer equal to the base, folding, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, inject_adapter_in_model

from nnunetv2_pemma.adaptation.conv_layers import LoRAConv3d, wrap_conv
from nnunetv2_pemma.adaptation.folding import fold_adapters

RANK, ALPHA = 3, 6  # scaling 2: a wrong scaling cannot pass
CASES = [  # (conv class, in, out, kernel, stride, padding, input spatial size)
    (nn.Conv3d, 2, 5, (3, 3, 3), 1, 1, (6, 7, 8)),
    (nn.Conv3d, 3, 4, (1, 3, 3), (1, 2, 2), (0, 1, 1), (5, 8, 9)),  # anisotropic and strided, as nnU-Net's stems
    (nn.Conv3d, 4, 4, 1, 1, 0, (4, 4, 4)),
    (nn.Conv2d, 2, 6, (3, 3), 2, 1, (9, 10)),
]


class Holder(nn.Module):
    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.parametrize("cls, c_in, c_out, kernel, stride, padding, size", CASES)
def test_matches_peft(cls, c_in, c_out, kernel, stride, padding, size) -> None:
    base = cls(c_in, c_out, kernel, stride, padding, bias=True)
    ours = wrap_conv(copy.deepcopy(base), RANK, ALPHA)
    with torch.no_grad():
        ours.conv_lora_B.normal_()  # a trained-looking update, so the test sees the low-rank path
    ref = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["conv"], lora_dropout=0.0),
                                  Holder(copy.deepcopy(base)))
    with torch.no_grad():
        ref.conv.lora_A["default"].weight.copy_(ours.conv_lora_A)
        ref.conv.lora_B["default"].weight.copy_(ours.conv_lora_B)
    for p in ref.conv.base_layer.parameters():  # peft freezes the base; ours leaves that to the trainer
        p.requires_grad_(True)
    x = torch.randn(2, c_in, *size)
    out_ours, out_ref = ours(x), ref(x)
    assert out_ours.shape == out_ref.shape == base(x).shape
    torch.testing.assert_close(out_ours, out_ref)
    target = torch.randn_like(out_ours)
    (out_ours * target).sum().backward()
    (out_ref * target).sum().backward()
    torch.testing.assert_close(ours.conv_lora_A.grad, ref.conv.lora_A["default"].weight.grad)
    torch.testing.assert_close(ours.conv_lora_B.grad, ref.conv.lora_B["default"].weight.grad)
    torch.testing.assert_close(ours.weight.grad, ref.conv.base_layer.weight.grad)


def test_fresh_layer_is_the_base_and_keeps_its_names() -> None:
    base = nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1))
    wrapped = LoRAConv3d(base, RANK, ALPHA)
    x = torch.randn(1, 2, 3, 6, 6)
    assert torch.equal(wrapped(x), base(x))
    assert wrapped.weight is base.weight and wrapped.bias is base.bias
    assert set(dict(wrapped.named_parameters())) == {"weight", "bias", "conv_lora_A", "conv_lora_B"}
    assert wrapped.conv_lora_A.shape == (RANK, 2, 1, 3, 3) and wrapped.conv_lora_B.shape == (4, RANK, 1, 1, 1)
    wrapped.enabled = False
    with torch.no_grad():
        wrapped.conv_lora_B.fill_(1.0)
    assert torch.equal(wrapped(x), base(x)), "a disabled adapter is the base"


def test_folding_gives_the_same_outputs() -> None:
    net = nn.Sequential(nn.Conv3d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv3d(3, 2, (1, 3, 3), stride=(1, 2, 2)))
    for i in (0, 2):
        net[i] = wrap_conv(net[i], RANK, ALPHA)
        with torch.no_grad():
            net[i].conv_lora_B.normal_()
    x = torch.randn(2, 1, 4, 8, 8)
    expected = net(x)
    fold_adapters(net)
    assert all(type(m) in (nn.Conv3d, nn.ReLU) for m in net)
    assert not any("lora" in k for k in net.state_dict())
    torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("conv", [nn.Conv3d(4, 4, 3, groups=2), nn.Conv3d(2, 2, 3, dilation=2),
                                  nn.Conv3d(2, 2, 3, padding=1, padding_mode="reflect"), nn.Linear(2, 2)])
def test_refuses_what_it_cannot_wrap(conv: nn.Module) -> None:
    with pytest.raises(ValueError):
        wrap_conv(conv, RANK, ALPHA)
    with pytest.raises(ValueError, match="rank must be at least 1"):
        wrap_conv(nn.Conv3d(2, 2, 3), 0, ALPHA)
