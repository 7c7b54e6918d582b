"""Networks built from the plans' "pemma" block, as trainers and nnUNetv2_predict need them."""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from nnunetv2_pemma.errors import PlansError
from nnunetv2_pemma.networks import PEMMAUNETR, build_unetr
from nnunetv2_pemma.networks.early_fusion import EarlyFusionUNETR
from nnunetv2_pemma.networks.pemma_swin import PEMMASwinUNETR
from nnunetv2_pemma.networks.swin import build_swin_unetr

_PLAIN = {"UNETR": build_unetr, "SwinUNETR": build_swin_unetr}
_PEMMA = {"UNETR": PEMMAUNETR, "SwinUNETR": PEMMASwinUNETR}


def architecture(pemma: dict[str, Any]) -> str:
    name = pemma["model"].get("architecture", "UNETR")
    if name not in _PLAIN:
        raise PlansError(f"model architecture {name!r} is not one of {sorted(_PLAIN)}")
    return name


def build_plain_network(pemma: dict[str, Any], num_input_channels: int, num_outputs: int,
                        patch_size: Sequence[int]) -> nn.Module:
    """MONAI UNETR or SwinUNETR over all input channels: a CT base, a PET-only model, a plain multi-channel one."""
    return _PLAIN[architecture(pemma)](pemma["model"], num_input_channels, num_outputs, patch_size)


def build_pemma_network(pemma: dict[str, Any], num_outputs: int, patch_size: Sequence[int]) -> nn.Module:
    """PEMMA network with modality slots CT and PET, fed the dataset's channels (pemma['input_modalities'])."""
    return _PEMMA[architecture(pemma)](pemma["model"], pemma["adaptation"], num_outputs, patch_size,
                                       pemma["input_modalities"])


def build_early_fusion_unetr(pemma: dict[str, Any], num_outputs: int, patch_size: Sequence[int]) -> EarlyFusionUNETR:
    """Two-channel (CT, PET) UNETR fed the dataset's channels; an absent modality is a zero channel."""
    if architecture(pemma) != "UNETR":
        raise PlansError("early fusion is implemented for UNETR presets")
    return EarlyFusionUNETR(pemma["model"], num_outputs, patch_size, pemma["input_modalities"])
