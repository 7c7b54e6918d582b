"""Networks built from the plans' "pemma" block, as trainers and nnUNetv2_predict need them."""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from nnunetv2_pemma.networks import PEMMAUNETR, build_unetr
from nnunetv2_pemma.networks.early_fusion import EarlyFusionUNETR


def build_plain_unetr(pemma: dict[str, Any], num_input_channels: int, num_outputs: int,
                      patch_size: Sequence[int]) -> nn.Module:
    """MONAI UNETR over all input channels: the CT base, a PET-only model, or an early-fusion model."""
    return build_unetr(pemma["model"], num_input_channels, num_outputs, patch_size)


def build_pemma_unetr(pemma: dict[str, Any], num_outputs: int, patch_size: Sequence[int]) -> PEMMAUNETR:
    """PEMMA network with modality slots CT and PET, fed the dataset's channels (pemma['input_modalities'])."""
    return PEMMAUNETR(pemma["model"], pemma["adaptation"], num_outputs, patch_size, pemma["input_modalities"])


def build_early_fusion_unetr(pemma: dict[str, Any], num_outputs: int, patch_size: Sequence[int]) -> EarlyFusionUNETR:
    """Two-channel (CT, PET) UNETR fed the dataset's channels; an absent modality is a zero channel."""
    return EarlyFusionUNETR(pemma["model"], num_outputs, patch_size, pemma["input_modalities"])
