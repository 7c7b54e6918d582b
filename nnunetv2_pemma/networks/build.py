"""Networks built from the plans' "pemma" block, as trainers and nnUNetv2_predict need them."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from nnunetv2_pemma.config import MODALITIES, PemmaBlock
from nnunetv2_pemma.errors import PlansError
from nnunetv2_pemma.networks.backbones.swin import SwinUNETRSpec, build_swin_unetr
from nnunetv2_pemma.networks.backbones.unetr import UNETRSpec, build_unetr
from nnunetv2_pemma.networks.early_fusion import EarlyFusionUNETR
from nnunetv2_pemma.networks.modality_channels import ModalityChannels, modality_channel_unet
from nnunetv2_pemma.networks.pemma_cnn import pemma_unet
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


def nnunet_unet(configuration_manager, num_input_channels: int, num_outputs: int,
                deep_supervision: bool) -> nn.Module:
    """nnU-Net's own network of the configuration (PlainConvUNet, ResidualEncoderUNet), as nnU-Net builds it."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    return get_network_from_plans(configuration_manager.network_arch_class_name,
                                  configuration_manager.network_arch_init_kwargs,
                                  configuration_manager.network_arch_init_kwargs_req_import, num_input_channels,
                                  num_outputs, allow_init=True, deep_supervision=deep_supervision)


def build_pemma_unet(configuration_manager, num_outputs: int, deep_supervision: bool) -> nn.Module:
    """nnU-Net's U-Net of the configuration built for one (CT) channel, in its PEMMA form (modality slots CT and
    PET, conv adapters), fed the dataset's channels."""
    block = PemmaBlock.of(configuration_manager)
    unet = nnunet_unet(configuration_manager, 1, num_outputs, deep_supervision)
    return pemma_unet(unet, block.adaptation, block.input_modalities)


def build_modality_channel_unet(configuration_manager, num_outputs: int, deep_supervision: bool,
                                modality_dropout: bool = True) -> nn.Module:
    """nnU-Net's U-Net of the configuration over (CT, PET) channels, fed the dataset's channels (an absent one
    zero), with the preset's modality dropout in training (unless `modality_dropout` is False)."""
    block = PemmaBlock.of(configuration_manager)
    unet = nnunet_unet(configuration_manager, len(MODALITIES), num_outputs, deep_supervision)
    return modality_channel_unet(unet, block.input_modalities,
                                 block.adaptation.modality_dropout if modality_dropout else None)
