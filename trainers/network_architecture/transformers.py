"""Transformer networks trained from scratch by nnU-Net: MONAI's UNETR and SwinUNETR built from a preset."""

from __future__ import annotations

import torch
from torch import nn

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_pemma.config import PEMMA_KEY, PemmaBlock
from nnunetv2_pemma.errors import PlansError
from nnunetv2_pemma.networks.build import build_plain_network
from nnunetv2_pemma.trainers.common import FewCasesNeedFoldAll, OneLineErrors
from nnunetv2_pemma.training.augmentation import select_transforms
from nnunetv2_pemma.training.seeding import seed_training
from nnunetv2_pemma.training.threads import limit_cpu_threads
from nnunetv2_pemma.worker_pools import validation_in_threads
from nnunetv2_pemma.training.optim import build_optimizer


class UNETRTrainer(OneLineErrors, FewCasesNeedFoldAll, nnUNetTrainer):
    """MONAI UNETR from the plans preset (any number of input channels): no deep supervision, AdamW and the
    preset's iteration budget and learning-rate schedule. The base of every trainer of this package (their
    common behaviour: `common.py`)."""

    architecture = "UNETR"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        limit_cpu_threads(self.device)
        # before anything draws a random number: the network and its adapters are built in initialize()
        self.seed = seed_training(self.local_rank)
        self.pemma = PemmaBlock.of(self.configuration_manager)
        if self.pemma.model.architecture != self.architecture:
            raise PlansError(f"{type(self).__name__} trains a {self.architecture}, but configuration {configuration} "
                             f"holds a {self.pemma.model.architecture} preset; pick the trainer of that architecture")
        schedule = self.pemma.schedule
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = schedule.epochs
        self.initial_lr = schedule.initial_lr
        self.weight_decay = schedule.weight_decay
        self.enable_deep_supervision = False

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return build_plain_network(PemmaBlock.of(configuration_manager), num_input_channels, num_output_channels,
                                   configuration_manager.patch_size)

    def on_train_start(self):
        if self.seed is not None:
            # nnUNetv2_train turns cuDNN's benchmark mode on after building the trainer
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
            self.print_to_log_file(f"seeded with {self.seed} (PEMMA_SEED)")
        super().on_train_start()

    def _set_pemma(self, block: PemmaBlock) -> None:
        """Change this run's block, also in the plans that plans.json and checkpoints record (and that nnU-Net's
        configuration manager, from which build_network_architecture reads it, holds)."""
        self.pemma = block
        self.plans_manager.plans["configurations"][self.configuration_name][PEMMA_KEY] = block.to_json()
        self.configuration_manager.configuration[PEMMA_KEY] = block.to_json()

    def configure_optimizers(self):
        if self.pemma.schedule.optimizer == "SGD":  # nnU-Net's own, with the preset's learning rate and budget
            return nnUNetTrainer.configure_optimizers(self)
        return build_optimizer(self.network, self.pemma.schedule, self.num_epochs)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """UNETR has one output head: nothing to switch."""

    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's, with its export and scoring pools as threads on a one-worker CPU training (worker_pools)."""
        with validation_in_threads(self.device):
            return super().perform_actual_validation(save_probabilities)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """As nnU-Net, but without test-time mirroring when the preset says so, and with patches cut at their
        final size when the preset turns spatial augmentation off (as nnUNetTrainerNoDA)."""
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not self.pemma.schedule.test_time_mirroring:
            self.inference_allowed_mirroring_axes = None
        if not self.pemma.augmentation.spatial:
            initial_patch_size = self.configuration_manager.patch_size
        return rotation, dummy_2d, initial_patch_size, mirror_axes

    def get_training_transforms(self, *args, **kwargs):
        """nnU-Net's training transforms, less the groups the preset's data_augmentation section turns off.
        (An instance method where nnU-Net's is static: nnU-Net calls it through self.)"""
        return select_transforms(nnUNetTrainer.get_training_transforms(*args, **kwargs), self.pemma.augmentation)


class SwinUNETRTrainer(UNETRTrainer):
    """MONAI SwinUNETR from the plans preset (e.g. `--preset swin`): the CT base of the Swin variant."""

    architecture = "SwinUNETR"
