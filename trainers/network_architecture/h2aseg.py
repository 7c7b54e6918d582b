"""H2ASeg (MICCAI 2024), a peer of PEMMA trained from scratch on CT+PET, with nnU-Net's deep supervision."""

from __future__ import annotations

from torch import nn

from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2_pemma.config import PemmaBlock
from nnunetv2_pemma.networks.build import build_h2aseg
from nnunetv2_pemma.networks.peers.h2aseg import level_weights
from nnunetv2_pemma.trainers.network_architecture.deep_supervision import ChannelNetworkDeepSupervision
from nnunetv2_pemma.trainers.network_architecture.transformers import UNETRTrainer


class H2ASegTrainer(ChannelNetworkDeepSupervision, UNETRTrainer):
    """H2ASeg from an "H2ASeg" preset (e.g. `h2aseg`: widths 8-128, window 8x8x4, Adam 1e-4). Every level's
    prediction is supervised through nnU-Net's own machinery (targets down-sampled by its data loader, its
    Dice + cross-entropy loss in DeepSupervisionWrapper) with the paper's level weights (6 - k), normalised. An
    absent modality is a zero image, so one model fills the C, P and CP cells."""

    architecture = "H2ASeg"

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return build_h2aseg(PemmaBlock.of(configuration_manager), num_output_channels,
                            configuration_manager.patch_size, enable_deep_supervision)

    def _get_deep_supervision_scales(self) -> list[list[float]] | None:
        """One scale per level (H2ASeg halves the patch at each), highest resolution first."""
        if not self.enable_deep_supervision:
            return None
        dims = len(self.configuration_manager.patch_size)
        return [[0.5**level] * dims for level in range(len(self.pemma.model.widths))]

    def _build_loss(self) -> nn.Module:
        """nnU-Net's loss and deep-supervision wrapper with the paper's weights in place of nnU-Net's 1/2**k."""
        loss = super()._build_loss()
        if not self.enable_deep_supervision:
            return loss
        return DeepSupervisionWrapper(loss.loss, level_weights(len(self.pemma.model.widths)))
