"""Deep supervision kept on for the peers built over the dataset's channels (H2ASeg, the 2.5D network)."""

from __future__ import annotations

import torch

from nnunetv2_pemma.trainers.adaptation.adapting import unwrap


class ChannelNetworkDeepSupervision:
    """Mixin for a UNETRTrainer subclass (which turns deep supervision off): nnU-Net's deep supervision back on,
    switched through the network's ModalityChannels layer, which knows where the network keeps its switch."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = True

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        unwrap(self.network).set_deep_supervision(enabled)
