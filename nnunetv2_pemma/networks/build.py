"""Networks built from the plans' "pemma" block, as trainers and nnUNetv2_predict need them."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from nnunetv2_pemma.config import MODALITIES, PemmaBlock
from nnunetv2_pemma.errors import PlansError
from nnunetv2_pemma.networks.backbones.swin import SwinUNETRSpec, build_swin_unetr
from nnunetv2_pemma.networks.backbones.unetr import UNETRSpec, build_unetr
from nnunetv2_pemma.networks.early_fusion import EarlyFusionUNETR
from nnunetv2_pemma.networks.modality_channels import ModalityChannels
from nnunetv2_pemma.networks.pemma_swin import PEMMASwinUNETR
from nnunetv2_pemma.networks.peers.h2aseg import H2ASeg
from nnunetv2_pemma.networks.peers.slice_interaction import SliceInteractionNet
from nnunetv2_pemma.networks.peers.specs import H2ASegSpec, SliceInteractionSpec
from nnunetv2_pemma.networks.pemma_unetr import PEMMAUNETR
from nnunetv2_pemma.networks.prognosis import SurvivalEarlyFusionUNETR, SurvivalPEMMAUNETR, SurvivalUNETR

_PLAIN = {UNETRSpec: build_unetr, SwinUNETRSpec: build_swin_unetr}
_PEMMA = {UNETRSpec: PEMMAUNETR, SwinUNETRSpec: PEMMASwinUNETR}


def build_plain_network(block: PemmaBlock, num_input_channels: int, num_outputs: int,
                        patch_size: Sequence[int]) -> nn.Module:
    """MONAI UNETR or SwinUNETR over all input channels: a CT base, a PET-only model, a plain multi-channel one."""
    return _PLAIN[type(block.model)](block.model, num_input_channels, num_outputs, patch_size)


def build_pemma_network(block: PemmaBlock, num_outputs: int, patch_size: Sequence[int]) -> nn.Module:
    """PEMMA network with modality slots CT and PET, fed the dataset's channels (block.input_modalities)."""
    return _PEMMA[type(block.model)](block.model, block.adaptation, num_outputs, patch_size, block.input_modalities)


def build_early_fusion(block: PemmaBlock, num_outputs: int, patch_size: Sequence[int]) -> EarlyFusionUNETR:
    """Two-channel (CT, PET) UNETR fed the dataset's channels; an absent modality is a zero channel."""
    if not isinstance(block.model, UNETRSpec):
        raise PlansError(f"early fusion is implemented for UNETR presets, not {block.model.architecture}")
    return EarlyFusionUNETR(block.model, num_outputs, patch_size, block.input_modalities)


def _prognosis_spec(block: PemmaBlock) -> UNETRSpec:
    if not isinstance(block.model, UNETRSpec):
        raise PlansError(f"prognosis is implemented for UNETR presets, not {block.model.architecture}")
    return block.model


def build_survival_network(block: PemmaBlock, num_input_channels: int, num_outputs: int,
                           patch_size: Sequence[int]) -> SurvivalUNETR:
    """MONAI UNETR with a survival head: the CT base of prognosis (or a one-modality prognosis model)."""
    return SurvivalUNETR(_prognosis_spec(block), num_input_channels, num_outputs, patch_size)


def build_survival_pemma(block: PemmaBlock, num_outputs: int, patch_size: Sequence[int],
                         clinical: bool) -> SurvivalPEMMAUNETR:
    """PEMMA UNETR with the survival head; `clinical` adds the clinical token."""
    return SurvivalPEMMAUNETR(_prognosis_spec(block), block.adaptation, num_outputs, patch_size,
                              block.input_modalities, clinical=clinical)


def build_survival_early_fusion(block: PemmaBlock, num_outputs: int, patch_size: Sequence[int],
                                clinical: bool) -> SurvivalEarlyFusionUNETR:
    """Early-fusion UNETR with the survival head; `clinical` feeds the clinical vector to the head."""
    return SurvivalEarlyFusionUNETR(_prognosis_spec(block), num_outputs, patch_size, block.input_modalities,
                                    clinical=clinical)


def build_h2aseg(block: PemmaBlock, num_outputs: int, patch_size: Sequence[int],
                 deep_supervision: bool) -> ModalityChannels:
    """H2ASeg over the dataset's channels (an absent modality a zero image, as for early fusion)."""
    spec = block.model
    if not isinstance(spec, H2ASegSpec):
        raise PlansError(f"H2ASeg needs an H2ASeg preset, not {spec.architecture}")
    network = H2ASeg(num_outputs, spec.check_patch_size(patch_size), spec.widths, spec.window, spec.norm_name,
                     deep_supervision=deep_supervision)
    return ModalityChannels(network, block.input_modalities)


def build_slice_interaction(block: PemmaBlock, unet: nn.Module) -> ModalityChannels:
    """The 2.5D network: the slice interaction module in front of `unet`, nnU-Net's 2-D U-Net built for
    2 modalities x `slices` input channels, fed the dataset's channels' neighbouring slices."""
    spec = block.model
    if not isinstance(spec, SliceInteractionSpec):
        raise PlansError(f"the 2.5D trainer needs a SliceInteraction25D preset, not {spec.architecture}")
    network = SliceInteractionNet(unet, len(MODALITIES), spec.slices, spec.reduction, spec.spatial_kernel)
    return ModalityChannels(network, block.input_modalities, spec.slices)
