"""Unit tests of the UNETR base, the LoRA layer and the PEMMA network (tiny models, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import changed_keys, train_step
import torch.nn as nn

from nnunetv2_pemma.networks import (
    PEMMAUNETR,
    IncompatibleBaseError,
    LoRAQKVLinear,
    add_lora_to_vit,
    build_unetr,
    count_parameters,
    freeze_for_adaptation,
    freeze_for_continual,
    is_pemma_parameter,
    pemma_trainable_parameter_names,
    sample_modality_masks,
    set_lora_enabled,
)

PLANS = Path(__file__).resolve().parents[1] / "plans"
TINY = json.loads((PLANS / "tiny.json").read_text())
PAPER = json.loads((PLANS / "paper.json").read_text())
IMG = (32, 32, 32)
CLASSES = 3


def tiny_base(img_size=IMG, **model_overrides) -> nn.Module:
    return build_unetr({**TINY["model"], **model_overrides}, 1, CLASSES, img_size).eval()


def tiny_pemma(modalities=("CT", "PET"), **adaptation_overrides) -> PEMMAUNETR:
    adaptation = {**TINY["adaptation"], **adaptation_overrides}
    return PEMMAUNETR(TINY["model"], adaptation, CLASSES, IMG, modalities).eval()


def adapted(base: nn.Module, modalities=("CT", "PET"), **adaptation_overrides) -> PEMMAUNETR:
    net = tiny_pemma(modalities, **adaptation_overrides)
    net.load_base_state_dict(base.state_dict())
    return net


def perturb_lora(net: nn.Module) -> None:
    """Give every LoRA B a non-zero value, as after some training."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)


def image(channels: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, channels, *IMG)


# --- UNETR base ---------------------------------------------------------------------------------------------


def test_build_unetr_rejects_img_size_not_multiple_of_16():
    with pytest.raises(ValueError, match=r"\[32, 40, 32\]"):
        build_unetr(TINY["model"], 1, CLASSES, (32, 40, 32))


def test_build_unetr_rejects_unknown_model_key():
    with pytest.raises(ValueError, match="hiden_size"):
        build_unetr({**TINY["model"], "hiden_size": 48}, 1, CLASSES, IMG)


# --- LoRAQKVLinear ------------------------------------------------------------------------------------------


def test_lora_linear_keeps_base_parameters_and_function_at_init():
    base = nn.Linear(48, 144, bias=True)
    lora = LoRAQKVLinear(base, rank=4, alpha=8)
    assert lora.weight is base.weight and lora.bias is base.bias
    assert lora.scaling == 2.0
    assert {n for n, _ in lora.named_parameters()} == {"weight", "bias", "lora_A_q", "lora_B_q", "lora_A_v", "lora_B_v"}
    assert lora.lora_A_q.shape == (4, 48) and lora.lora_B_v.shape == (48, 4)
    assert lora.lora_A_q.abs().sum() > 0 and lora.lora_B_q.abs().sum() == 0

    x = torch.randn(2, 10, 48)
    assert torch.equal(lora(x), base(x))
    result = nn.Linear(48, 144).load_state_dict(lora.state_dict(), strict=False)
    assert sorted(result.unexpected_keys) == ["lora_A_q", "lora_A_v", "lora_B_q", "lora_B_v"]


def test_lora_linear_updates_only_q_and_v_and_merges():
    base = nn.Linear(48, 144, bias=False)
    lora = LoRAQKVLinear(base, rank=4, alpha=4)
    perturb_lora(lora)
    x = torch.randn(2, 10, 48)
    out, ref = lora(x), base(x)
    q, k, v = (slice(0, 48), slice(48, 96), slice(96, 144))
    assert torch.equal(out[..., k], ref[..., k])
    assert not torch.allclose(out[..., q], ref[..., q]) and not torch.allclose(out[..., v], ref[..., v])
    torch.testing.assert_close(x @ lora.merged_weight().T, out)

    lora.enabled = False
    assert torch.equal(lora(x), ref)
    assert lora.merged_weight() is lora.weight


def test_lora_linear_rejects_bad_arguments():
    with pytest.raises(ValueError, match="3 \\* d"):
        LoRAQKVLinear(nn.Linear(48, 100), rank=4, alpha=4)
    with pytest.raises(ValueError, match="rank"):
        LoRAQKVLinear(nn.Linear(48, 144), rank=0, alpha=4)


def test_add_lora_to_vit_replaces_every_qkv_once():
    vit = tiny_base().vit
    layers = add_lora_to_vit(vit, rank=2, alpha=2)
    assert len(layers) == len(vit.blocks) == 12
    assert all(blk.attn.qkv is layer for blk, layer in zip(vit.blocks, layers))
    with pytest.raises(ValueError, match="block 0"):
        add_lora_to_vit(vit, rank=2, alpha=2)


# --- PEMMAUNETR: structure and equivalence with the base -----------------------------------------------------


def test_base_names_are_kept_and_new_names_are_marked():
    base = tiny_base()
    net = tiny_pemma()
    base_keys, net_keys = set(base.state_dict()), set(net.state_dict())
    new_keys = net_keys - base_keys
    assert base_keys <= net_keys
    assert all(k.startswith("pet_") or "lora" in k for k in new_keys)
    assert {k.split(".")[0] for k in new_keys if k.startswith("pet_")} == {
        "pet_patch_embedding",
        "pet_encoder1",
        "pet_beta",
    }
    assert sum("lora_" in k for k in new_keys) == 12 * 4
    result = net.load_state_dict(base.state_dict(), strict=False)
    assert set(result.missing_keys) == new_keys and not result.unexpected_keys


@pytest.mark.parametrize("lora_enabled", [False, True])
def test_ct_only_drop_mode_equals_base(lora_enabled):
    base = tiny_base()
    net = adapted(base, ["CT"], missing_modality="drop")
    set_lora_enabled(net, lora_enabled)  # enabled at init: B = 0, so still exactly the base
    x = image(1, batch=2)
    with torch.no_grad():
        assert torch.equal(net(x), base(x))
        perturb_lora(net)
        assert torch.equal(net(x), base(x)) is not lora_enabled


def test_output_shape_and_flexible_inference_from_one_model():
    net = adapted(tiny_base())
    ct_pet = image(2, batch=2)
    outputs = {}
    with torch.no_grad():
        for mods, x in ((["CT", "PET"], ct_pet), (["CT"], ct_pet[:, :1]), (["PET"], ct_pet[:, 1:])):
            net.set_input_modalities(mods)
            outputs["+".join(mods)] = out = net(x)
            assert out.shape == (2, CLASSES, *IMG)
        # zero mode (the paper): a missing modality is a zero image
        net.set_input_modalities(["CT", "PET"])
        torch.testing.assert_close(outputs["CT"], net(torch.cat([ct_pet[:, :1], torch.zeros_like(ct_pet[:, :1])], 1)))
        net.set_input_modalities(["PET", "CT"])  # channel order follows the declaration
        torch.testing.assert_close(outputs["CT+PET"], net(ct_pet.flip(1)))
    assert not torch.allclose(outputs["CT+PET"], outputs["CT"])

    with pytest.raises(ValueError, match="channels"):
        net(image(1))
    with pytest.raises(ValueError, match="MRI"):
        net.set_input_modalities(["CT", "MRI"])


def test_drop_mode_pet_only_uses_pet_tokens_and_pet_skip():
    base = tiny_base()
    net = adapted(base, ["PET"], missing_modality="drop")  # tiny preset: pet_init "cross", beta 1
    x = image(1, batch=2)
    with torch.no_grad():
        # with cross init the PET branches are copies of the CT ones, so PET alone behaves like the CT base
        assert torch.equal(net(x), base(x))


# --- initialisation from the base ---------------------------------------------------------------------------


def test_cross_init_copies_ct_modules():
    base = tiny_base()
    net = adapted(base, pet_init="cross")
    for pet, ct in ((net.pet_patch_embedding, net.vit.patch_embedding), (net.pet_encoder1, net.encoder1)):
        for (name, p), q in zip(pet.state_dict().items(), ct.state_dict().values()):
            assert torch.equal(p, q), name
    assert net.pet_patch_embedding.position_embeddings is not net.vit.patch_embedding.position_embeddings


def test_zero_init_zeros_pet_projection_and_pet_skip_output():
    net = adapted(tiny_base(), pet_init="zero")
    for p in net.pet_patch_embedding.patch_embeddings.parameters():
        assert p.abs().sum() == 0
    assert net.pet_patch_embedding.position_embeddings.abs().sum() > 0
    with torch.no_grad():
        assert net.pet_encoder1(image(1)).abs().sum() == 0


def test_random_init_keeps_fresh_pet_modules():
    net = tiny_pemma(pet_init="random")
    fresh = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("pet_")}
    net.load_base_state_dict(tiny_base().state_dict())
    for k, v in fresh.items():
        assert torch.equal(net.state_dict()[k], v), k
    assert not torch.equal(net.pet_encoder1.layer.conv1.conv.weight, net.encoder1.layer.conv1.conv.weight)


@pytest.mark.parametrize(
    ("base_kwargs", "message"),
    [
        ({"img_size": (48, 48, 48)}, r"position embeddings 1x27x48 vs 1x8x48: patch size differs \(48\^3 vs 32\^3\)"),
        ({"hidden_size": 60}, "hidden size 60 vs 48"),
        ({"in_channels": 2}, "input channels 2 vs 1"),
        ({"qkv_bias": True}, r"12 unexpected keys, e.g. \['vit.blocks.0.attn.qkv.bias'"),
    ],
)
def test_incompatible_base_raises_clear_error(base_kwargs, message):
    img_size = base_kwargs.pop("img_size", IMG)
    in_channels = base_kwargs.pop("in_channels", 1)
    base = build_unetr({**TINY["model"], **base_kwargs}, in_channels, CLASSES, img_size)
    with pytest.raises(ValueError, match=message) as info:
        tiny_pemma().load_base_state_dict(base.state_dict())
    assert isinstance(info.value, IncompatibleBaseError)


def test_pemma_checkpoint_is_not_a_base():
    net = tiny_pemma()
    with pytest.raises(IncompatibleBaseError, match="PEMMA parameters"):
        net.load_base_state_dict(net.state_dict())


# --- freezing and training steps ----------------------------------------------------------------------------


def test_adaptation_step_trains_only_pemma_parameters():
    net = adapted(tiny_base(), learnable_beta=True)
    trainable = freeze_for_adaptation(net)
    assert trainable == pemma_trainable_parameter_names(net)
    assert "pet_beta" in trainable and all(is_pemma_parameter(n) for n in trainable)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    train_step(net, image(2, batch=2))
    changed = changed_keys(before, net)
    assert changed and all(is_pemma_parameter(k) for k in changed)  # base bit-identical
    assert {k for k in before if k.startswith("pet_") or "lora_B" in k} <= changed
    assert all(p.grad is None for n, p in net.named_parameters() if not is_pemma_parameter(n))


def test_continual_step_with_ct_only_trains_only_lora():
    net = adapted(tiny_base(), ["CT"])  # PET is a zero image
    assert all("lora_" in n for n in freeze_for_continual(net))
    perturb_lora(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    train_step(net, image(1, batch=2))
    changed = changed_keys(before, net)
    assert changed == {k for k in before if "lora_" in k}


def test_learnable_beta_is_a_parameter_fixed_beta_a_buffer():
    assert "pet_beta" in dict(tiny_pemma(learnable_beta=True).named_parameters())
    net = tiny_pemma(learnable_beta=False, beta=0.5)
    assert "pet_beta" not in dict(net.named_parameters()) and net.state_dict()["pet_beta"] == 0.5


# --- modality dropout ---------------------------------------------------------------------------------------


def test_sample_modality_masks_draws_all_patterns():
    keep_ct, keep_pet = sample_modality_masks([0.5, 0.25, 0.25], 400)
    patterns = {(bool(c), bool(p)) for c, p in zip(keep_ct, keep_pet)}
    assert patterns == {(True, True), (True, False), (False, True)}
    assert 0.15 < (~keep_pet).float().mean() < 0.35


def test_modality_dropout_zeroes_inputs_in_training_only():
    net = tiny_pemma(modality_dropout=[0.4, 0.3, 0.3])
    seen = {}
    net.vit.patch_embedding.register_forward_pre_hook(lambda m, args: seen.update(ct=args[0]))
    net.pet_patch_embedding.register_forward_pre_hook(lambda m, args: seen.update(pet=args[0]))

    def patterns() -> set[tuple[bool, bool]]:
        has = {m: seen[m].flatten(1).abs().sum(1) > 0 for m in ("ct", "pet")}
        return {(bool(c), bool(p)) for c, p in zip(has["ct"], has["pet"])}

    x = image(2, batch=12)
    with torch.no_grad():
        net.train()
        net(x)
        assert patterns() == {(True, True), (True, False), (False, True)}
        net.eval()
        net(x)
        assert patterns() == {(True, True)}


# --- paper preset size --------------------------------------------------------------------------------------


def test_paper_preset_trainable_parameter_count():
    img = tuple(PAPER["patch_size"])
    base_total, _ = count_parameters(build_unetr(PAPER["model"], 1, 3, img))
    net = PEMMAUNETR(PAPER["model"], PAPER["adaptation"], 3, img)
    freeze_for_adaptation(net)
    total, trainable = count_parameters(net)

    def size(prefix: str) -> int:
        return sum(p.numel() for n, p in net.named_parameters() if n.startswith(prefix))

    lora = sum(p.numel() for n, p in net.named_parameters() if "lora_" in n)
    pet_embedding, pet_skip = size("pet_patch_embedding"), size("pet_encoder1")
    ratio = trainable / base_total
    print(
        f"\nUNETR-B {img}: base {base_total:,}, PEMMA {total:,}, trainable {trainable:,} ({ratio:.2%} of base): "
        f"PET embedding {pet_embedding:,}, PET skip {pet_skip:,}, LoRA {lora:,}"
    )
    assert total == base_total + trainable
    assert trainable == pet_embedding + pet_skip + lora
    rank, hidden = PAPER["adaptation"]["lora_rank"], PAPER["model"]["hidden_size"]
    assert lora == 12 * 2 * 2 * rank * hidden  # 12 blocks, Q and V, A and B
    assert 0.01 < ratio < 0.20
