"""nnU-Net's own U-Nets under a preset's budget: the "nnU-Net 3d_fullres" rows of `pemma compare`, trained from
scratch on the dataset's channels or, with channel dropout, on random CT+PET / CT / PET inputs."""

from __future__ import annotations

import torch
from torch import nn

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_pemma.config import MODALITIES, PemmaBlock
from nnunetv2_pemma.networks.build import build_modality_channel_unet
from nnunetv2_pemma.trainers.network_architecture.transformers import UNETRTrainer


class NNUNetNetwork:
    """Mixin for trainers of nnU-Net's own U-Net from an "nnUNet" preset (which inherits the planned
    configuration, e.g. 3d_fullres): nnU-Net's network, loss and deep supervision; with the preset's optimizer
    "SGD", its optimiser; the preset's patch, batch and iteration budget."""

    architecture = "nnUNet"
    set_deep_supervision_enabled = nnUNetTrainer.set_deep_supervision_enabled

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = True


class nnUNetPresetTrainer(NNUNetNetwork, UNETRTrainer):
    """nnU-Net's network on the dataset's channels, measured under the same conditions as the other rows: a CT
    base on CT, or a CT+PET model that then also predicts from CT or PET alone (the absent one a zero channel)."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        if set(PemmaBlock.of(configuration_manager).modality_normalization) == set(MODALITIES):
            return build_modality_channel_unet(configuration_manager, num_output_channels, enable_deep_supervision,
                                               modality_dropout=False)
        return nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                        num_output_channels, enable_deep_supervision)


class nnUNetChannelDropoutTrainer(NNUNetNetwork, UNETRTrainer):
    """nnU-Net's U-Net from scratch on (CT, PET) with channel dropout: each training sample keeps CT+PET, CT or
    PET with the preset's ``adaptation.modality_dropout`` probabilities, the other channel zero after
    normalisation (the "blank channel" training of DeMoSeg's nnU-Net v2 trainer and of Zhao et al., Med Phys 2024).
    One model then takes CT, PET or both (`pemma predict --modalities`), an absent modality a zero channel."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return build_modality_channel_unet(configuration_manager, num_output_channels, enable_deep_supervision)

