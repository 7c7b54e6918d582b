"""Early fusion (PEMMA paper, section 2.1): the CT model's input layers widened to CT and PET channels."""

from __future__ import annotations

from torch import nn

from nnunetv2_pemma.config import PemmaBlock
from nnunetv2_pemma.networks.build import build_early_fusion
from nnunetv2_pemma.networks.early_fusion import widen_to_two_channels
from nnunetv2_pemma.training.checkpoints import input_channels, load_checkpoint_file
from nnunetv2_pemma.trainers.adaptation.adapting import AdaptingTrainer


class EarlyFusionTrainer(AdaptingTrainer):
    """Baseline (paper section 2.1): the CT UNETR's patch embedding and input skip widened to (CT, PET) channels,
    then the whole model trains. From an early-fusion checkpoint on a one-modality dataset it fine-tunes with the
    absent channel zero, which is how the forgetting PEMMA avoids is measured."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return build_early_fusion(PemmaBlock.of(configuration_manager), num_output_channels,
                                  configuration_manager.patch_size)

    @classmethod
    def expected_checkpoint(cls, path: str) -> str:
        return "ct_base" if input_channels(load_checkpoint_file(path)) == 1 else "early_fusion"

    def convert(self, ct_base: nn.Module) -> nn.Module:
        fused = self._adapted_network()
        fused.load_state_dict(widen_to_two_channels(ct_base.state_dict(), fused.state_dict(),
                                                    self.pemma.adaptation.pet_init))
        return fused
