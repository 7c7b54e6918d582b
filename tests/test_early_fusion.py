"""Early fusion's widening of a CT UNETR to (CT, PET) channels."""

from __future__ import annotations

import pytest
import torch

from networks_helpers import CLASSES, Tiny
from nnunetv2_pemma.errors import PlansError
from nnunetv2_pemma.networks.build import build_early_fusion
from nnunetv2_pemma.networks.early_fusion import EarlyFusionUNETR, widen_to_two_channels

TINY = Tiny.of("UNETR")
SIZE = TINY.img


@pytest.fixture(scope="module")
def ct_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return TINY.base()


def _fused(ct_model: torch.nn.Module, pet_init: str) -> EarlyFusionUNETR:
    fused = EarlyFusionUNETR(TINY.preset.model, CLASSES, SIZE).eval()
    fused.load_state_dict(widen_to_two_channels(ct_model.state_dict(), fused.state_dict(), pet_init))
    return fused


def test_only_input_layers_are_widened(ct_model: torch.nn.Module) -> None:
    fused = _fused(ct_model, "cross").state_dict()
    ct = ct_model.state_dict()
    widened = sorted(k for k in ct if ct[k].shape != fused[k].shape)
    assert widened == ["encoder1.layer.conv1.conv.weight", "encoder1.layer.conv3.conv.weight",
                       "vit.patch_embedding.patch_embeddings.weight"]
    for k in ct:
        if k in widened:
            assert torch.equal(fused[k][:, :1], ct[k]) and torch.equal(fused[k][:, 1:], ct[k])
        else:
            assert torch.equal(fused[k], ct[k])


def test_zero_init_keeps_the_ct_function(ct_model: torch.nn.Module) -> None:
    fused = _fused(ct_model, "zero")
    x = torch.randn(1, 1, *SIZE)
    with torch.no_grad():
        assert torch.allclose(fused(torch.cat([x, torch.randn_like(x)], 1)), ct_model(x), atol=1e-6)


def test_random_init_differs_from_cross(ct_model: torch.nn.Module) -> None:
    key = "vit.patch_embedding.patch_embeddings.weight"
    assert not torch.equal(_fused(ct_model, "random").state_dict()[key][:, 1:], ct_model.state_dict()[key])


def test_absent_modality_is_a_zero_channel(ct_model: torch.nn.Module) -> None:
    fused = _fused(ct_model, "cross")
    x = torch.randn(1, 1, *SIZE)
    with torch.no_grad():
        both = fused(torch.cat([torch.zeros_like(x), x], 1))
        fused.set_input_modalities(["PET"])
        assert torch.equal(fused(x), both)


def test_bad_pet_init_and_foreign_base_fail(ct_model: torch.nn.Module) -> None:
    fused = EarlyFusionUNETR(TINY.preset.model, CLASSES, SIZE)
    with pytest.raises(ValueError, match="pet_init"):
        widen_to_two_channels(ct_model.state_dict(), fused.state_dict(), "ones")
    other = TINY.with_model(hidden_size=60, num_heads=3).base()
    with pytest.raises(ValueError, match="cannot be widened|lacks"):
        widen_to_two_channels(other.state_dict(), fused.state_dict(), "zero")


def test_built_from_the_plans_block_for_unetr_only() -> None:
    fused = build_early_fusion(TINY.block(("PET",)), CLASSES, SIZE)
    assert isinstance(fused, EarlyFusionUNETR) and fused.input_modalities == ("PET",)
    with pytest.raises(PlansError, match="early fusion is implemented for UNETR presets, not SwinUNETR"):
        build_early_fusion(Tiny.of("SwinUNETR").block(), CLASSES, Tiny.of("SwinUNETR").img)
