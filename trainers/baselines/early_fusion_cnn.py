"""Early fusion on nnU-Net's U-Net: the CT model's first convolution widened to CT and PET, then all of it trains."""

from __future__ import annotations

from typing import Any

from torch import nn

from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from nnunetv2_pemma.config import PemmaBlock

from nnunetv2_pemma.networks.build import build_modality_channel_unet, nnunet_unet
from nnunetv2_pemma.networks.early_fusion import widen_to_two_channels
from nnunetv2_pemma.trainers.adaptation.pemma_cnn import WholeCheckpoint
from nnunetv2_pemma.trainers.baselines.early_fusion import EarlyFusionTrainer
from nnunetv2_pemma.trainers.network_architecture.nnunet_unet import NNUNetNetwork
from nnunetv2_pemma.training.checkpoints import check_unet_checkpoint, input_channels_of_unet, load_checkpoint_file


class EarlyFusionCNNTrainer(WholeCheckpoint, NNUNetNetwork, EarlyFusionTrainer):
    """Baseline: nnU-Net fine-tuned from a CT model with its first convolution widened to (CT, PET) (the PET
    kernel per the preset's ``pet_init``), every weight trained, with the preset's modality dropout. Start it with
    `-pretrained_weights <nnU-Net CT model>`; from an early-fusion checkpoint on a one-modality dataset it
    fine-tunes with the absent channel zero."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return build_modality_channel_unet(configuration_manager, num_output_channels, enable_deep_supervision)

    @classmethod
    def expected_checkpoint(cls, path: str) -> str:
        return "ct_base" if input_channels_of_unet(load_checkpoint_file(path)) == 1 else "early_fusion"

    @classmethod
    def check_pretrained(cls, path: str, expect: str, block: PemmaBlock, plans_manager: PlansManager,
                         configuration_manager: ConfigurationManager) -> dict[str, Any]:
        return check_unet_checkpoint(path, plans_manager.plans, configuration_manager, expect=expect)

    def network_to_load(self, expect: str) -> nn.Module | None:
        if expect != "ct_base":
            return None
        return nnunet_unet(self.configuration_manager, 1, self.label_manager.num_segmentation_heads,
                           self.enable_deep_supervision)

    def convert(self, ct_base: nn.Module) -> nn.Module:
        fused = self._adapted_network()
        fused.load_state_dict(widen_to_two_channels(ct_base.state_dict(), fused.state_dict(),
                                                    self.pemma.adaptation.pet_init))
        return fused
