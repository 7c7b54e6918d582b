"""Unit tests of the SwinUNETR base and its PEMMA adaptation (tiny models from plans/swin_tiny.json, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import changed_keys, train_step
import torch.nn as nn

import nnunetv2_pemma.networks.lora as lora_lib
from nnunetv2_pemma.networks.lora import LoRAQKVLinear, set_lora_enabled
from nnunetv2_pemma.networks.pemma_swin import PEMMASwinUNETR, add_lora_to_swin
from nnunetv2_pemma.networks.pemma_unetr import (
    IncompatibleBaseError,
    count_parameters,
    freeze_for_adaptation,
    freeze_for_continual,
    is_pemma_parameter,
    pemma_trainable_parameter_names,
)
from nnunetv2_pemma.networks.swin import build_swin_unetr
from nnunetv2_pemma.networks.unetr import build_unetr

PLANS = Path(__file__).resolve().parents[1] / "plans"
TINY = json.loads((PLANS / "swin_tiny.json").read_text())
SWIN = json.loads((PLANS / "swin.json").read_text())
IMG = tuple(TINY["patch_size"])  # (32, 32, 64): the smallest patch a SwinUNETR with instance norm trains on
CLASSES = 3
NUM_BLOCKS = sum(TINY["model"]["depths"])


def tiny_base(in_channels: int = 1, **model_overrides) -> nn.Module:
    return build_swin_unetr({**TINY["model"], **model_overrides}, in_channels, CLASSES, IMG).eval()


def tiny_pemma(modalities=("CT", "PET"), **adaptation_overrides) -> PEMMASwinUNETR:
    adaptation = {**TINY["adaptation"], **adaptation_overrides}
    return PEMMASwinUNETR(TINY["model"], adaptation, CLASSES, IMG, modalities).eval()


def adapted(base: nn.Module, modalities=("CT", "PET"), **adaptation_overrides) -> PEMMASwinUNETR:
    net = tiny_pemma(modalities, **adaptation_overrides)
    net.load_base_state_dict(base.state_dict())
    return net


def perturb(net: nn.Module, *markers: str) -> None:
    """Give every parameter whose name contains a marker a random value, as after some training."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if any(m in name for m in markers):
                p.normal_(std=0.05)


def image(channels: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, channels, *IMG)


# --- SwinUNETR base -----------------------------------------------------------------------------------------


def test_build_swin_unetr_checks_patch_size_and_model_section():
    with pytest.raises(ValueError, match=r"multiples of 32.*\[32, 48, 64\]"):
        build_swin_unetr(TINY["model"], 1, CLASSES, (32, 48, 64))
    with pytest.raises(ValueError, match="1x1x1 bottleneck"):
        build_swin_unetr(TINY["model"], 1, CLASSES, (32, 32, 32))
    with pytest.raises(ValueError, match="feature_sise"):
        build_swin_unetr({**TINY["model"], "feature_sise": 12}, 1, CLASSES, IMG)
    with pytest.raises(ValueError, match="SwinUNETR"):
        build_swin_unetr({**TINY["model"], "architecture": "UNETR"}, 1, CLASSES, IMG)
    with pytest.raises(ValueError, match="num_heads"):
        build_swin_unetr({**TINY["model"], "num_heads": [5, 5, 5, 5]}, 1, CLASSES, IMG)


def test_add_lora_to_swin_wraps_every_block_once():
    swin = tiny_base().swinViT
    layers = add_lora_to_swin(swin, rank=2, alpha=2)
    assert len(layers) == NUM_BLOCKS and all(isinstance(layer, LoRAQKVLinear) for layer in layers)
    assert swin.layers3[0].blocks[0].attn.qkv is layers[2]
    with pytest.raises(ValueError, match="layers1 block 0"):
        add_lora_to_swin(swin, rank=2, alpha=2)


def test_dora_method_wraps_qkv_with_dora_or_fails_clearly():
    if getattr(lora_lib, "wrap_qkv", None) is None:
        with pytest.raises(ValueError, match="wrap_qkv"):
            tiny_pemma(method="dora")
    else:
        base = tiny_base()
        net = adapted(base, ["CT"], method="dora", missing_modality="drop")
        qkv = net.swinViT.layers2[0].blocks[0].attn.qkv
        assert type(qkv).__name__ == "DoRAQKVLinear" and net.adaptation_method == "dora"
        new = set(net.state_dict()) - set(base.state_dict())
        assert all(is_pemma_parameter(k) for k in new)
        assert {n for n, _ in net.named_parameters() if "lora_" in n} == set(freeze_for_continual(net))
        x = image(1)
        with torch.no_grad():  # DoRA also starts as the base function
            torch.testing.assert_close(net(x), base(x))
    with pytest.raises(ValueError, match="method"):
        tiny_pemma(method="ia3")


# --- structure and equivalence with the base ----------------------------------------------------------------


def test_base_names_are_kept_and_new_names_are_marked():
    base = tiny_base()
    net = tiny_pemma()
    base_keys, net_keys = set(base.state_dict()), set(net.state_dict())
    new_keys = net_keys - base_keys
    assert base_keys <= net_keys
    assert all(k.startswith("pet_") or "lora" in k for k in new_keys)
    assert all(is_pemma_parameter(k) for k in new_keys)
    assert {k.split(".")[0] for k in new_keys if k.startswith("pet_")} == {
        "pet_patch_embed",
        "pet_fusion",
        "pet_encoder1",
        "pet_beta",
    }
    assert sum("lora_" in k for k in new_keys) == NUM_BLOCKS * 4
    result = net.load_state_dict(base.state_dict(), strict=False)
    assert set(result.missing_keys) == new_keys and not result.unexpected_keys


@pytest.mark.parametrize("lora_enabled", [False, True])
def test_ct_only_drop_mode_equals_base(lora_enabled):
    base = tiny_base()
    net = adapted(base, ["CT"], missing_modality="drop")
    set_lora_enabled(net, lora_enabled)
    perturb(net, "pet_")  # drop mode: the PET modules, fusion included, play no part without PET
    x = image(1)
    with torch.no_grad():
        assert torch.equal(net(x), base(x))
        perturb(net, "lora_B")
        assert torch.equal(net(x), base(x)) is not lora_enabled


def test_ct_pet_at_init_keeps_the_base_function():
    base = tiny_base()
    ct_pet = image(2)
    ct = ct_pet[:, :1]
    with torch.no_grad():
        # fusion = CT identity and LoRA B = 0: the Swin stages see exactly the CT patch features
        net = adapted(base)
        assert torch.equal(net.patch_features(ct, ct_pet[:, 1:]), base.swinViT.patch_embed(ct))
        for h_net, h_base in zip(net.swin_stages(net.patch_features(ct, ct_pet[:, 1:])), base.swinViT(ct)):
            assert torch.equal(h_net, h_base)
        # with beta = 0 the PET skip is off too: CT+PET in, the CT base's output out
        assert torch.equal(adapted(base, beta=0.0)(ct_pet), base(ct))


def test_output_shape_and_flexible_inference_from_one_model():
    net = adapted(tiny_base())
    perturb(net, "pet_fusion", "lora_B")  # as after adaptation: PET now reaches the Swin stages
    ct_pet = image(2)
    outputs = {}
    with torch.no_grad():
        for mods, x in ((["CT", "PET"], ct_pet), (["CT"], ct_pet[:, :1]), (["PET"], ct_pet[:, 1:])):
            net.set_input_modalities(mods)
            outputs["+".join(mods)] = out = net(x)
            assert out.shape == (1, CLASSES, *IMG)
        # zero mode (the paper): a missing modality is a zero image
        net.set_input_modalities(["CT", "PET"])
        torch.testing.assert_close(outputs["CT"], net(torch.cat([ct_pet[:, :1], torch.zeros_like(ct_pet[:, :1])], 1)))
        net.set_input_modalities(["PET", "CT"])  # channel order follows the declaration
        torch.testing.assert_close(outputs["CT+PET"], net(ct_pet.flip(1)))
    assert not torch.allclose(outputs["CT+PET"], outputs["CT"])
    assert not torch.allclose(outputs["CT+PET"], outputs["PET"])

    with pytest.raises(ValueError, match="channels"):
        net(image(1))
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(1, 2, 32, 32, 48))


def test_drop_mode_pet_only_uses_pet_features_and_pet_skip():
    base = tiny_base()
    net = adapted(base, ["PET"], missing_modality="drop")  # tiny preset: pet_init "cross", beta 1
    perturb(net, "pet_fusion")  # not used with one modality in drop mode
    x = image(1)
    with torch.no_grad():
        # with cross init the PET branches are copies of the CT ones, so PET alone behaves like the CT base
        assert torch.equal(net(x), base(x))


# --- initialisation from the base ---------------------------------------------------------------------------


def test_cross_init_copies_ct_modules_and_resets_fusion():
    base = tiny_base()
    net = tiny_pemma(pet_init="cross")
    perturb(net, "pet_fusion")
    net.load_base_state_dict(base.state_dict())
    for pet, ct in ((net.pet_patch_embed, net.swinViT.patch_embed), (net.pet_encoder1, net.encoder1)):
        for (name, p), q in zip(pet.state_dict().items(), ct.state_dict().values()):
            assert torch.equal(p, q), name
    c = TINY["model"]["feature_size"]
    weight = net.pet_fusion.weight.view(c, 2 * c)
    assert torch.equal(weight, torch.cat([torch.eye(c), torch.zeros(c, c)], 1))
    assert net.pet_fusion.bias.abs().sum() == 0


def test_zero_init_pet_features_ignore_the_image_but_still_learn():
    net = adapted(tiny_base(), pet_init="zero")
    assert net.pet_patch_embed.proj.weight.abs().sum() == 0
    with torch.no_grad():
        a, b = net.pet_patch_embed(image(1)), net.pet_patch_embed(image(1))
        assert torch.equal(a, b) and a.abs().sum() > 0  # the bias only: image-independent, not zero
        assert net.pet_encoder1(image(1)).abs().sum() == 0
    freeze_for_adaptation(net)
    net.train()
    net(image(2)).square().mean().backward()
    c = TINY["model"]["feature_size"]
    assert net.pet_fusion.weight.grad[:, c:].abs().sum() > 0  # the PET half is not stuck at zero


def test_random_init_keeps_fresh_pet_modules():
    net = tiny_pemma(pet_init="random")
    fresh = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("pet_")}
    net.load_base_state_dict(tiny_base().state_dict())
    for k, v in fresh.items():
        assert torch.equal(net.state_dict()[k], v), k
    assert not torch.equal(net.pet_encoder1.layer.conv1.conv.weight, net.encoder1.layer.conv1.conv.weight)
    assert not torch.equal(net.pet_patch_embed.proj.weight, net.swinViT.patch_embed.proj.weight)


@pytest.mark.parametrize(
    ("base_kwargs", "message"),
    [
        ({"feature_size": 24}, "feature size 24 vs 12"),
        ({"depths": [2, 1, 1, 1]}, r"depths \[2, 1, 1, 1\] vs \[1, 1, 1, 1\]"),
        ({"num_heads": [3, 6, 12, 12]}, r"num_heads \[3, 6, 12, 12\] vs \[3, 3, 3, 3\]"),
        ({"window_size": 2}, "window size 2 vs 4"),
        ({"in_channels": 2}, "input channels 2 vs 1"),
        ({"use_v2": True}, "use_v2 True vs False"),
        ({"qkv_bias": False}, "qkv_bias False vs True"),
    ],
)
def test_incompatible_base_raises_clear_error(base_kwargs, message):
    in_channels = base_kwargs.pop("in_channels", 1)
    base = build_swin_unetr({**TINY["model"], **base_kwargs}, in_channels, CLASSES, IMG)
    with pytest.raises(ValueError, match=message) as info:
        tiny_pemma().load_base_state_dict(base.state_dict())
    assert isinstance(info.value, IncompatibleBaseError)


def test_unetr_base_and_pemma_checkpoint_are_not_swin_bases():
    unetr = build_unetr(json.loads((PLANS / "tiny.json").read_text())["model"], 1, CLASSES, IMG)
    net = tiny_pemma()
    with pytest.raises(IncompatibleBaseError, match="it is a UNETR"):
        net.load_base_state_dict(unetr.state_dict())
    with pytest.raises(IncompatibleBaseError, match="PEMMA parameters"):
        net.load_base_state_dict(net.state_dict())


# --- freezing and training steps ----------------------------------------------------------------------------


def test_adaptation_step_trains_only_pemma_parameters():
    net = adapted(tiny_base(), learnable_beta=True)
    trainable = freeze_for_adaptation(net)
    assert trainable == pemma_trainable_parameter_names(net)
    assert {"pet_beta", "pet_fusion.weight", "pet_fusion.bias"} <= set(trainable)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    train_step(net, image(2))
    changed = changed_keys(before, net)
    assert changed and all(is_pemma_parameter(k) for k in changed)  # base bit-identical
    assert {k for k in before if k.startswith("pet_") or "lora_B" in k} <= changed
    assert all(p.grad is None for n, p in net.named_parameters() if not is_pemma_parameter(n))


def test_continual_step_with_ct_only_trains_only_lora():
    net = adapted(tiny_base(), ["CT"])  # PET is a zero image
    assert all("lora_" in n for n in freeze_for_continual(net))
    perturb(net, "lora_B", "pet_fusion")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    train_step(net, image(1))
    changed = changed_keys(before, net)
    assert changed == {k for k in before if "lora_" in k}


def test_learnable_beta_is_a_parameter_fixed_beta_a_buffer():
    assert "pet_beta" in dict(tiny_pemma(learnable_beta=True).named_parameters())
    net = tiny_pemma(learnable_beta=False, beta=0.5)
    assert "pet_beta" not in dict(net.named_parameters()) and net.state_dict()["pet_beta"] == 0.5


class _Stop(Exception):
    pass


def test_modality_dropout_zeroes_inputs_in_training_only():
    net = tiny_pemma(modality_dropout=[0.4, 0.3, 0.3])
    seen = {}
    net.swinViT.patch_embed.register_forward_pre_hook(lambda m, args: seen.update(ct=args[0]))
    net.pet_patch_embed.register_forward_pre_hook(lambda m, args: seen.update(pet=args[0]))

    def stop(module, args):  # both inputs seen: skip the expensive rest
        raise _Stop

    net.pet_fusion.register_forward_pre_hook(stop)

    def patterns() -> set[tuple[bool, bool]]:
        with pytest.raises(_Stop):
            net(x)
        has = {m: seen[m].flatten(1).abs().sum(1) > 0 for m in ("ct", "pet")}
        return {(bool(c), bool(p)) for c, p in zip(has["ct"], has["pet"])}

    x = torch.randn(16, 2, *IMG)
    with torch.no_grad():
        net.train()
        assert patterns() == {(True, True), (True, False), (False, True)}
        net.eval()
        assert patterns() == {(True, True)}


# --- paper-scale preset size --------------------------------------------------------------------------------


def test_swin_preset_trainable_parameter_count():
    img = tuple(SWIN["patch_size"])
    base_total, _ = count_parameters(build_swin_unetr(SWIN["model"], 1, 3, img))
    net = PEMMASwinUNETR(SWIN["model"], SWIN["adaptation"], 3, img)
    freeze_for_adaptation(net)
    total, trainable = count_parameters(net)

    def size(prefix: str) -> int:
        return sum(p.numel() for n, p in net.named_parameters() if n.startswith(prefix))

    lora = sum(p.numel() for n, p in net.named_parameters() if "lora_" in n)
    embed, fusion, skip = size("pet_patch_embed"), size("pet_fusion"), size("pet_encoder1")
    ratio = trainable / base_total
    print(
        f"\nSwinUNETR-48 {img}: base {base_total:,}, PEMMA {total:,}, trainable {trainable:,} ({ratio:.2%} of base): "
        f"PET embedding {embed:,}, fusion {fusion:,}, PET skip {skip:,}, LoRA {lora:,}"
    )
    assert total == base_total + trainable
    assert trainable == embed + fusion + skip + lora
    c, rank = SWIN["model"]["feature_size"], SWIN["adaptation"]["lora_rank"]
    widths = [c * 2**i for i in range(4)]
    assert lora == sum(d * 2 * 2 * rank * w for d, w in zip(SWIN["model"]["depths"], widths))  # Q, V; A, B
    assert fusion == 2 * c * c + c and embed == 8 * c + c
    assert 0.001 < ratio < 0.05
