"""nnU-Net's own U-Net under a preset's budget: the "nnU-Net 3d_fullres (2 channels)" row of `pemma compare`."""

from __future__ import annotations

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_pemma.trainers.network_architecture.transformers import UNETRTrainer


class nnUNetPresetTrainer(UNETRTrainer):
    """nnU-Net's network, loss, deep supervision and (with the preset's optimizer "SGD") its optimiser, on the
    preset's patch, batch and iteration budget, so it is measured under the same conditions as the other rows.
    The preset (architecture "nnUNet") inherits the planned configuration, e.g. 3d_fullres with both channels."""

    architecture = "nnUNet"
    build_network_architecture = staticmethod(nnUNetTrainer.build_network_architecture)
    set_deep_supervision_enabled = nnUNetTrainer.set_deep_supervision_enabled

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = True
