"""Early fusion (PEMMA paper, section 2.1): one UNETR over the channel-stacked CT and PET image.

The CT UNETR's patch embedding and input-skip block are widened to two input channels; the CT channel keeps its
weights and the PET channel starts random, zero or as a copy of the CT channel's (cross-modal). The whole model
trains afterwards, so CT and PET features entangle: the forgetting this causes is what PEMMA avoids.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from monai.networks.nets import UNETR

from nnunetv2_pemma.config import MODALITIES, PET_INITS
from nnunetv2_pemma.networks.backbones.unetr import UNETRSpec, enable_sdpa, freeze_unused_norms
from nnunetv2_pemma.networks.modality_channels import fill_modality_channels
from nnunetv2_pemma.networks.modality_slots import check_modalities

class EarlyFusionUNETR(UNETR):
    """MONAI UNETR with input channels (CT, PET); a modality absent from the input is a zero channel.

    Parameter names are MONAI UNETR's, so checkpoints load into a plain 2-channel UNETR too.
    """

    def __init__(self, spec: UNETRSpec, out_channels: int, img_size: Sequence[int],
                 input_modalities: Sequence[str] = MODALITIES) -> None:
        super().__init__(in_channels=len(MODALITIES), out_channels=out_channels,
                         img_size=spec.check_patch_size(img_size), **spec.kwargs())
        enable_sdpa(self.vit)
        freeze_unused_norms(self.vit)
        self.set_input_modalities(input_modalities)

    def set_input_modalities(self, modalities: Sequence[str]) -> None:
        """Declare which modalities the input channels hold, in order (flexible C, P or CP inference)."""
        self.input_modalities = check_modalities(modalities)

    def fill_channels(self, x_in: torch.Tensor) -> torch.Tensor:
        """(B, len(input_modalities), D, H, W) -> (B, 2, D, H, W) in (CT, PET) order, an absent modality zero."""
        return fill_modality_channels(x_in, self.input_modalities)

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        """x_in: (B, len(input_modalities), D, H, W) -> logits (B, out_channels, D, H, W)."""
        return super().forward(self.fill_channels(x_in))


def widen_to_two_channels(ct_state: Mapping[str, torch.Tensor], fused_state: Mapping[str, torch.Tensor],
                          pet_init: str) -> dict[str, torch.Tensor]:
    """Early-fusion weights from a CT model's: every tensor whose input-channel dim grew from 1 to 2 keeps the CT
    weights in channel 0 and gets its PET channel 1 from `pet_init`; all other tensors are the CT model's.

    Args:
        ct_state: state dict of the single-channel CT model.
        fused_state: state dict of a freshly initialised two-channel model (source of "random" PET weights).
        pet_init: "random" (fresh init), "zero" or "cross" (copy of the CT channel).
    """
    if pet_init not in PET_INITS:
        raise ValueError(f"pet_init must be one of {PET_INITS}, got {pet_init!r}")
    missing = sorted(set(fused_state) - set(ct_state))
    if missing:
        raise ValueError(f"the CT state dict lacks {missing[:3]}{'...' if len(missing) > 3 else ''}: not the base "
                         f"of this network")
    widened = {}
    for key, fresh in fused_state.items():
        ct = ct_state[key]
        if ct.shape == fresh.shape:
            widened[key] = ct.clone()
            continue
        if ct.ndim < 2 or ct.shape[1] != 1 or fresh.shape[1] != 2 or ct.shape[2:] != fresh.shape[2:] \
                or ct.shape[0] != fresh.shape[0]:
            raise ValueError(f"{key}: CT shape {tuple(ct.shape)} cannot be widened to {tuple(fresh.shape)}")
        pet = {"random": fresh[:, 1:2], "zero": torch.zeros_like(ct), "cross": ct}[pet_init]
        widened[key] = torch.cat([ct, pet], dim=1).clone()
    return widened
