"""The 2.5D slice-interaction network, a peer of PEMMA: nnU-Net's 2-D U-Net over neighbouring slices."""

from __future__ import annotations

import sys

from torch import nn

from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_pemma.config import MODALITIES, PemmaBlock
from nnunetv2_pemma.errors import CheckpointError
from nnunetv2_pemma.networks.build import build_slice_interaction
from nnunetv2_pemma.trainers.network_architecture.deep_supervision import ChannelNetworkDeepSupervision
from nnunetv2_pemma.trainers.common import run_by_nnunetv2_predict, run_by_nnunetv2_train
from nnunetv2_pemma.training.checkpoints import pretrained_weights_argument
from nnunetv2_pemma.trainers.network_architecture.transformers import UNETRTrainer
from nnunetv2_pemma.training.slice_stacking import NeighbourDatasets


class SliceInteractionTrainer(ChannelNetworkDeepSupervision, UNETRTrainer):
    """A "SliceInteraction25D" preset on a configuration inheriting nnU-Net's `2d`: every training sample is one
    slice's patch with its k neighbours of each modality stacked as channels (reflected at the volume's ends), fed
    through the slice interaction module into nnU-Net's 2-D U-Net (its deep supervision, loss and data
    augmentation), predicting the centre slice. nnU-Net's own final validation runs unchanged on stacked volumes;
    `pemma predict` stacks the neighbours for nnU-Net's predictor (nnUNetv2_predict cannot: its 2-D sliding
    window passes the network single slices)."""

    architecture = "SliceInteraction25D"

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        if run_by_nnunetv2_predict():  # before nnU-Net predicts (wrongly) or writes anything
            print("nnUNetv2_predict: error: a 2.5D model (SliceInteractionTrainer) needs the neighbouring slices of "
                  "every slice, which nnUNetv2_predict's 2-D sliding window does not pass; predict with `pemma "
                  "predict` (same arguments), which runs nnU-Net's predictor on the stacked slices",
                  file=sys.stderr, flush=True)
            raise SystemExit(2)
        block = PemmaBlock.of(configuration_manager)
        unet = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager,
                                                        len(MODALITIES) * block.model.slices, num_output_channels,
                                                        enable_deep_supervision)
        return build_slice_interaction(block, unet)

    def initialize(self) -> None:
        """nnU-Net's, with the dataset class that stacks neighbouring slices (training loaders and the final
        validation both load cases through it)."""
        super().initialize()
        self.dataset_class = NeighbourDatasets(infer_dataset_class(self.preprocessed_dataset_folder),
                                               self.pemma.model.slices)


class SliceInteractionFineTuningTrainer(SliceInteractionTrainer):
    """The 2.5D paper's transfer-learning recipe: a model pre-trained on a large source dataset (given as
    `-pretrained_weights`, e.g. SliceInteractionTrainer on the pre-training centres' CT+PET) fine-tuned on a small
    target one (a new centre). Its own results folder keeps it beside the from-scratch run it is reported against
    (`pemma compare`)."""

    def on_train_start(self) -> None:
        if self.current_epoch == 0 and run_by_nnunetv2_train() and pretrained_weights_argument() is None:
            raise CheckpointError(f"{type(self).__name__} fine-tunes a pre-trained 2.5D model: give the source "
                                  "model's checkpoint with -pretrained_weights (SliceInteractionTrainer trains from "
                                  "scratch)")
        super().on_train_start()
