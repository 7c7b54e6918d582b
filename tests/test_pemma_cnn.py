"""PEMMA on nnU-Net's own U-Nets (networks/pemma_cnn.py): modality slots, conv adapters and norm shifts on the
PlainConvUNet of the phantom's plans (anisotropic 1x3x3 first kernels, strided stages) and on a ResidualEncoderUNet
as nnU-Net's ResEnc plans build it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

from conftest import changed_keys
from nnunetv2_pemma.adaptation.conv_layers import LoRAConv3d, _LoRAConv, wrap_conv
from nnunetv2_pemma.adaptation.folding import fold_adapters
from nnunetv2_pemma.adaptation.methods import added_by, is_added, train_only
from nnunetv2_pemma.adaptation.norm_layers import ShiftedInstanceNorm3d, wrap_norm
from nnunetv2_pemma.config import Adaptation
from nnunetv2_pemma.errors import PlansError
from nnunetv2_pemma.networks.mismatch import IncompatibleBaseError
from nnunetv2_pemma.networks.modality_channels import modality_channel_unet
from nnunetv2_pemma.networks.pemma_cnn import input_stage_name, pemma_unet
from nnunetv2_pemma.plans import load_preset

COMMON = dict(conv_op=nn.Conv3d, conv_bias=True, norm_op=nn.InstanceNorm3d,
              norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})
KERNELS = [[1, 3, 3], [3, 3, 3], [3, 3, 3]]
STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
SHAPE = (2, 8, 16, 16)  # per modality: (B, D, H, W)


def plain_unet(channels: int = 1) -> nn.Module:
    """As the phantom's 3d_fullres plans, smaller: 1x3x3 kernels first, in-plane then isotropic strides."""
    return PlainConvUNet(channels, 3, [8, 16, 32], nn.Conv3d, KERNELS, STRIDES, [2, 2, 2], 3, [2, 2],
                         deep_supervision=True, **{k: v for k, v in COMMON.items() if k != "conv_op"})


def resenc_unet(channels: int = 1) -> nn.Module:
    """As nnU-Net's ResEnc plans (a stem, residual blocks with strided 1x1 skips), smaller."""
    return ResidualEncoderUNet(channels, 3, [8, 16, 32], nn.Conv3d, KERNELS, STRIDES, [1, 2, 2], 3, [1, 1],
                               deep_supervision=True, **{k: v for k, v in COMMON.items() if k != "conv_op"})


BUILDERS = {"PlainConvUNet": plain_unet, "ResidualEncoderUNet": resenc_unet}


def adaptation(**changes) -> Adaptation:
    return Adaptation.parse({"method": "conv_lora", "lora_rank": 2, "lora_alpha": 4, "pet_init": "zero",
                             "beta": 1.0, "learnable_beta": False, "missing_modality": "drop",
                             "modality_dropout": None, **changes})


def adapted(kind: str, **changes) -> tuple[nn.Module, nn.Module]:
    """(CT base, its PEMMA form loaded from the base's state dict), both in eval mode."""
    base = BUILDERS[kind]().eval()
    net = pemma_unet(BUILDERS[kind](), adaptation(**changes), ("CT", "PET"))
    net.load_base_state_dict(base.state_dict())
    return base, net.eval()


def logits(net: nn.Module, x: torch.Tensor, modalities: tuple[str, ...] = ("CT", "PET")) -> torch.Tensor:
    net.set_input_modalities(modalities)
    with torch.no_grad():
        return net(x)[0]


def trained_step(net: nn.Module, stage: str = "adaptation") -> nn.Module:
    """One SGD step over what `stage` trains, on random labels and every deep-supervision output."""
    train_only(net, stage)
    net.train()
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(2, len(net.input_modalities), *SHAPE[1:])
    loss = sum(out.square().mean() for out in net(x))
    loss.backward()
    optimizer.step()
    return net.eval()


@pytest.mark.parametrize("kind", BUILDERS)
def test_ct_alone_is_the_base_and_pet_starts_at_zero(kind: str) -> None:
    base, net = adapted(kind)
    ct, pet = torch.randn(SHAPE).unsqueeze(1), torch.randn(SHAPE).unsqueeze(1)
    with torch.no_grad():
        expected = base(ct)[0]
    assert torch.equal(logits(net, ct, ("CT",)), expected)
    assert torch.equal(logits(net, torch.cat([ct, pet], 1)), expected)  # "zero" PET slot: nothing added yet


@pytest.mark.parametrize("kind", BUILDERS)
def test_base_keeps_its_names_and_only_added_tensors_train(kind: str) -> None:
    base, net = adapted(kind)
    assert {k for k in net.state_dict() if not is_added(k)} == set(base.state_dict())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    changed = changed_keys(before, trained_step(net))
    assert changed and all(is_added(k) for k in changed)
    assert any(".pet_slot." in k for k in changed) and any("conv_lora_B" in k for k in changed)


@pytest.mark.parametrize("kind", BUILDERS)
def test_every_convolution_but_the_transposed_ones_adapts_in_the_forward(kind: str) -> None:
    """nnU-Net's conv blocks register each layer twice (``conv`` and ``all_modules``): the adapter must be the
    one the forward runs, so every wrapped convolution gets a gradient."""
    _, net = adapted(kind)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, LoRAConv3d):
                m.conv_lora_B.normal_()  # a trained-looking update: gradients reach A as well
    trained_step(net)
    wrapped = {id(m): m for m in net.modules() if isinstance(m, LoRAConv3d)}
    outside_pet = [m for n, m in net.named_modules() if type(m) is nn.Conv3d and ".pet_slot." not in f".{n}."]
    assert not outside_pet  # every plain convolution outside the PET slot is wrapped
    assert all(m.conv_lora_A.grad is not None and m.conv_lora_A.grad.abs().sum() > 0 for m in wrapped.values())
    assert any(isinstance(m, nn.ConvTranspose3d) for m in net.modules())  # left as they are (no peft LoRA)


@pytest.mark.parametrize("kind", BUILDERS)
def test_an_absent_modality_skips_its_slot(kind: str) -> None:
    _, net = adapted(kind, pet_init="cross")
    trained_step(net)
    ct, pet = torch.randn(SHAPE).unsqueeze(1), torch.randn(SHAPE).unsqueeze(1)
    pet_only, ct_only = logits(net, pet, ("PET",)), logits(net, ct, ("CT",))
    slot = net.get_submodule(input_stage_name(net))
    first_ct_conv = next(m for n, m in slot.named_modules() if isinstance(m, LoRAConv3d))
    with torch.no_grad():
        first_ct_conv.weight.add_(1.0)  # the CT slot changes: PET alone must not see it
    assert torch.equal(logits(net, pet, ("PET",)), pet_only)
    assert not torch.allclose(logits(net, ct, ("CT",)), ct_only)


def test_adapters_off_give_the_base_after_the_pet_slot_trained() -> None:
    base, net = adapted("PlainConvUNet", pet_init="cross")
    trained_step(net)
    net.reset_adapters()
    ct = torch.randn(SHAPE).unsqueeze(1)
    with torch.no_grad():
        assert torch.equal(logits(net, ct, ("CT",)), base(ct)[0])


def test_modality_dropout_blanks_the_slot_per_sample() -> None:
    """With every sample drawn "CT only", a CT+PET batch in training computes what CT alone computes (instance
    norms behave alike in training and evaluation)."""
    _, net = adapted("PlainConvUNet", pet_init="cross", modality_dropout=[0.0, 1.0, 0.0])
    trained_step(net)
    x = torch.randn(2, 2, *SHAPE[1:])
    expected = logits(net, x[:, :1], ("CT",))
    net.set_input_modalities(("CT", "PET"))
    net.train()
    with torch.no_grad():
        torch.testing.assert_close(net(x)[0], expected)


@pytest.mark.parametrize("kind", BUILDERS)
@pytest.mark.parametrize("train_norms", [False, True])
def test_folding_gives_the_same_labels(kind: str, train_norms: bool) -> None:
    _, net = adapted(kind, pet_init="cross", train_norms=train_norms)
    trained_step(net)
    trained_step(net)
    x = torch.randn(2, 2, *SHAPE[1:])
    folded = fold_adapters(copy.deepcopy(net))
    assert not any(isinstance(m, (LoRAConv3d, ShiftedInstanceNorm3d)) for m in folded.modules())
    unfolded_logits, folded_logits = logits(net, x), logits(folded, x)
    torch.testing.assert_close(folded_logits, unfolded_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(folded_logits.argmax(1), unfolded_logits.argmax(1))


def test_norm_shift_matches_torch_instance_norm_with_shifted_parameters() -> None:
    base = nn.InstanceNorm3d(4, affine=True)
    with torch.no_grad():
        base.weight.uniform_(0.5, 1.5)
        base.bias.normal_()
    shifted = wrap_norm(copy.deepcopy(base))
    x = torch.randn(2, 4, 3, 5, 6)
    assert torch.equal(shifted(x), base(x))  # zero shifts: the base
    with torch.no_grad():
        shifted.norm_shift_weight.normal_()
        shifted.norm_shift_bias.normal_()
        reference = nn.InstanceNorm3d(4, affine=True)
        reference.weight.copy_(base.weight + shifted.norm_shift_weight)
        reference.bias.copy_(base.bias + shifted.norm_shift_bias)
    torch.testing.assert_close(shifted(x), reference(x))
    torch.testing.assert_close(shifted.plain()(x), reference(x))
    with pytest.raises(ValueError, match="affine"):
        wrap_norm(nn.InstanceNorm3d(4, affine=False))


def test_trained_norms_leave_the_base_norms_and_the_base_function() -> None:
    base, net = adapted("PlainConvUNet", train_norms=True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    changed = changed_keys(before, trained_step(net))
    assert any("norm_shift_" in k for k in changed) and all(is_added(k) for k in changed)
    net.reset_adapters()
    ct = torch.randn(SHAPE).unsqueeze(1)
    with torch.no_grad():
        assert torch.equal(logits(net, ct, ("CT",)), base(ct)[0])


def test_default_presets_train_at_most_a_tenth_of_the_phantoms_unet() -> None:
    """The unet presets' adaptation on the U-Net nnU-Net plans for the phantom (4 stages, 32-256 features)."""
    kwargs = {**COMMON, "n_stages": 4, "features_per_stage": [32, 64, 128, 256],
              "kernel_sizes": [[1, 3, 3]] + [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
              "n_conv_per_stage": [2] * 4, "n_conv_per_stage_decoder": [2] * 3}
    for name in ("unet_tiny", "unet_demo", "unet"):
        preset = load_preset(name)
        base = PlainConvUNet(input_channels=1, num_classes=3, **kwargs)
        net = pemma_unet(PlainConvUNet(input_channels=1, num_classes=3, **kwargs), preset.adaptation, ("CT", "PET"))
        train_only(net, "adaptation")
        trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
        assert 0 < trainable <= 0.10 * sum(p.numel() for p in base.parameters()), name


def test_a_base_with_two_channels_is_refused_naming_them() -> None:
    net = pemma_unet(plain_unet(), adaptation(), ("CT", "PET"))
    with pytest.raises(IncompatibleBaseError, match="2 input channels vs 1"):
        net.load_base_state_dict(plain_unet(2).state_dict())


def test_a_qkv_method_is_refused_for_a_cnn() -> None:
    with pytest.raises(PlansError, match="does not adapt convolutions"):
        pemma_unet(plain_unet(), adaptation(method="lora"), ("CT", "PET"))


def test_modality_channel_unet_fills_an_absent_modality_with_zero() -> None:
    unet = plain_unet(2).eval()
    net = modality_channel_unet(copy.deepcopy(unet), ("PET",), modality_dropout=[0.0, 0.0, 1.0])
    pet = torch.randn(SHAPE).unsqueeze(1)
    with torch.no_grad():
        expected = unet(torch.cat([torch.zeros_like(pet), pet], 1))[0]
        assert torch.equal(net(pet)[0], expected)
        net.set_input_modalities(("CT", "PET"))
        net.train()  # every sample drawn "PET only": CT zeroed
        assert torch.equal(net(torch.cat([torch.randn_like(pet), pet], 1))[0], expected)
    assert set(net.state_dict()) == set(unet.state_dict())


def test_parameter_rows_of_a_trained_cnn() -> None:
    from nnunetv2_pemma.evaluation.parameters import format_parameter_table, measure_trained

    base, net = adapted("PlainConvUNet")
    rows = measure_trained(net)
    phi = sum(p.numel() for p in base.parameters())
    assert [r["method"].split(" ")[0] for r in rows] == ["CT", "Early", "Late", "PEMMA"]
    assert rows[0]["total"] == phi and rows[2]["total"] == 2 * phi
    assert rows[1]["total"] == phi + 8 * 1 * 3 * 3  # one more input channel in the 8 1x3x3 first kernels
    assert rows[-1]["trainable"] == sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert 0 < rows[-1]["adapter_bytes"] < rows[-1]["checkpoint_bytes"]
    assert "PEMMA (conv_lora, r=2, PET slot)" in format_parameter_table(rows)


def _routed_conv(kernel: tuple[int, ...], stride: tuple[int, ...]) -> tuple[nn.Conv3d, nn.Module]:
    base = nn.Conv3d(3, 5, kernel, stride, tuple(k // 2 for k in kernel))
    routed = wrap_conv(copy.deepcopy(base), rank=2, alpha=4, ct_only=True)
    with torch.no_grad():
        routed.conv_lora_B.normal_()
        routed.ct_lora_B.normal_()
    return base, routed


def _lora_of(base: nn.Conv3d, a: torch.Tensor, b: torch.Tensor) -> nn.Module:
    lora = wrap_conv(copy.deepcopy(base), rank=2, alpha=4)
    with torch.no_grad():
        lora.conv_lora_A.copy_(a)
        lora.conv_lora_B.copy_(b)
    return lora


@pytest.mark.parametrize("kernel, stride", [((1, 3, 3), (1, 2, 2)), ((3, 3, 3), (2, 2, 2))])
def test_the_ct_only_pair_acts_on_ct_only_samples_alone(kernel: tuple, stride: tuple) -> None:
    """Per sample, a routed conv LoRA is the plain conv LoRA (tested against peft) of the pair its input selects."""
    base, routed = _routed_conv(kernel, stride)
    pet_lora = _lora_of(base, routed.conv_lora_A, routed.conv_lora_B)
    ct_lora = _lora_of(base, routed.ct_lora_A, routed.ct_lora_B)
    x = torch.randn(3, 3, 4, 8, 8)
    with torch.no_grad():
        routed.holds_pet = torch.tensor([True, False, True])
        mixed = routed(x)
        routed.holds_pet = torch.tensor([False] * 3)
        ct_only = routed(x)
        routed.holds_pet = None  # unset: every sample holds PET
        unset = routed(x)
        torch.testing.assert_close(mixed[[0, 2]], pet_lora(x[[0, 2]]))
        torch.testing.assert_close(mixed[1], ct_lora(x[1:2])[0])
        torch.testing.assert_close(ct_only, ct_lora(x))
        torch.testing.assert_close(unset, pet_lora(x))
        for holds_pet, lora in ((True, pet_lora), (False, ct_lora)):
            torch.testing.assert_close(routed.plain(holds_pet)(x), lora(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="holds_pet"):
        routed.plain()


def _update_step(net: nn.Module, modalities: tuple[str, ...]) -> nn.Module:
    """One SGD step of a continual update on `modalities`, training what PEMMACNNContinualTrainer trains."""
    net.set_input_modalities(modalities)
    trained = net.trained_in_update()
    for name, p in net.named_parameters():
        p.requires_grad_(added_by(name) in trained)
    net.train()
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5, weight_decay=0.1)
    loss = sum(out.square().mean() for out in net(torch.randn(2, len(modalities), *SHAPE[1:])))
    loss.backward()
    optimizer.step()
    return net.eval()


@pytest.mark.parametrize("kind", BUILDERS)
def test_with_ct_only_adapters_ct_alone_stays_the_base_and_a_ct_update_leaves_pet_inputs(kind: str) -> None:
    base, net = adapted(kind, pet_init="cross", ct_only_adapters=True, modality_dropout=[0.5, 0.25, 0.25])
    trained_step(net)
    trained_step(net)
    ct, pet = torch.randn(SHAPE).unsqueeze(1), torch.randn(SHAPE).unsqueeze(1)
    both = torch.cat([ct, pet], 1)
    with torch.no_grad():
        assert torch.equal(logits(net, ct, ("CT",)), base(ct)[0])  # the PET pair and slot trained, CT alone: base
    assert not torch.equal(logits(net, both), base(ct)[0])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cp, p_only, c_only = logits(net, both), logits(net, pet, ("PET",)), logits(net, ct, ("CT",))
    changed = changed_keys(before, _update_step(net, ("CT",)))
    assert changed and {added_by(k) for k in changed} == {"ct_lora_"}
    assert torch.equal(logits(net, both), cp) and torch.equal(logits(net, pet, ("PET",)), p_only)
    assert not torch.equal(logits(net, ct, ("CT",)), c_only)
    changed = changed_keys({k: v.clone() for k, v in net.state_dict().items()}, _update_step(net, ("CT", "PET")))
    assert changed and {added_by(k) for k in changed} == {"conv_lora_"}  # an update with PET: the PET pair


def test_with_ct_only_adapters_modality_dropout_draws_no_ct_only_sample() -> None:
    adaptation_ = adaptation(ct_only_adapters=True, modality_dropout=[0.5, 0.25, 0.25])
    assert adaptation_.training_patterns() == pytest.approx((2 / 3, 0.0, 1 / 3))
    assert adaptation(modality_dropout=[0.5, 0.25, 0.25]).training_patterns() == (0.5, 0.25, 0.25)
    _, net = adapted("PlainConvUNet", ct_only_adapters=True, modality_dropout=[0.0, 0.5, 0.5])
    net.train()
    net(torch.randn(64, 2, 4, 8, 8))
    assert bool(net.input_slots.keep[:, 1].all())  # every sample kept PET: drawn "PET only"


@pytest.mark.parametrize("ct_only_adapters, train_norms, dropout, match", [
    (True, True, None, "exclude each other"), (True, False, [0.0, 1.0, 0.0], "must draw CT\\+PET or PET"),
    ("yes", False, None, "true or false")])
def test_ct_only_adapters_refuse_what_contradicts_them(ct_only_adapters, train_norms, dropout, match) -> None:
    with pytest.raises(ValueError, match=match):
        adaptation(ct_only_adapters=ct_only_adapters, train_norms=train_norms, modality_dropout=dropout)


@pytest.mark.parametrize("kind", BUILDERS)
def test_with_ct_only_adapters_folding_is_exact_per_input_pattern(kind: str) -> None:
    _, net = adapted(kind, pet_init="cross", ct_only_adapters=True)
    trained_step(net)
    _update_step(net, ("CT",))
    ct, both = torch.randn(SHAPE).unsqueeze(1), torch.randn(2, 2, *SHAPE[1:])
    with pytest.raises(TypeError, match="holds_pet"):
        fold_adapters(copy.deepcopy(net))
    for holds_pet, x, modalities in ((True, both, ("CT", "PET")), (True, both[:, 1:], ("PET",)),
                                     (False, ct, ("CT",))):
        folded = fold_adapters(copy.deepcopy(net), holds_pet=holds_pet)
        assert not any(isinstance(m, _LoRAConv) for m in folded.modules())
        unfolded_logits, folded_logits = logits(net, x, modalities), logits(folded, x, modalities)
        torch.testing.assert_close(folded_logits, unfolded_logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(folded_logits.argmax(1), unfolded_logits.argmax(1))
    with pytest.raises(ValueError, match="folded for CT alone"):
        logits(folded, both)
