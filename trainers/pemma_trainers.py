"""nnU-Net trainers for PEMMA, found by nnU-Net through `nnUNet_extTrainer=<repo>/trainers`.

One small subclass per behaviour; networks, freezing and checks live in `nnunetv2_pemma`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_pemma.adaptation.adapter import ADAPTER_FILE, save_adapter
from nnunetv2_pemma.errors import CheckpointError, PlansError
from nnunetv2_pemma.networks import freeze_for_adaptation, freeze_for_continual
from nnunetv2_pemma.networks.early_fusion import widen_to_two_channels
from nnunetv2_pemma.plans import PEMMA_KEY
from nnunetv2_pemma.training.checkpoints import (check_compatible, inherit_modality_normalization, input_channels,
                                                 load_checkpoint_file, pretrained_weights_in_flight)
from nnunetv2_pemma.training.augmentation import AugmentationChoice, select_transforms
from nnunetv2_pemma.training.config import epochs_from_schedule, limit_cpu_threads, pemma_config
from nnunetv2_pemma.training.networks import (architecture, build_early_fusion_unetr, build_pemma_network,
                                              build_plain_network)
from nnunetv2_pemma.training.optim import build_optimizer


def _unwrap(network: nn.Module) -> nn.Module:
    if isinstance(network, DDP):
        network = network.module
    return network._orig_mod if isinstance(network, OptimizedModule) else network


class UNETRTrainer(nnUNetTrainer):
    """MONAI UNETR from the plans preset (any number of input channels): no deep supervision, AdamW and the
    preset's iteration budget and learning-rate schedule."""

    architecture = "UNETR"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        limit_cpu_threads(self.device)
        self.pemma = pemma_config(self.configuration_manager)
        if architecture(self.pemma) != self.architecture:
            raise PlansError(f"{type(self).__name__} trains a {self.architecture}, but configuration {configuration} "
                             f"holds a {architecture(self.pemma)} preset; pick the trainer of that architecture")
        schedule = self.pemma["schedule"]
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = \
            epochs_from_schedule(schedule)
        self.initial_lr = schedule["initial_lr"]
        self.weight_decay = schedule["weight_decay"]
        self.augmentation = AugmentationChoice.from_pemma(self.pemma)
        self.enable_deep_supervision = False

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return build_plain_network(pemma_config(configuration_manager), num_input_channels, num_output_channels,
                                   configuration_manager.patch_size)

    def _set_pemma(self, section: str | None, key: str, value) -> None:
        """Override a preset value for this run, also in the plans that plans.json and checkpoints record."""
        for block in (self.pemma, self.plans_manager.plans["configurations"][self.configuration_name][PEMMA_KEY]):
            (block if section is None else block[section])[key] = value

    def configure_optimizers(self):
        return build_optimizer(self.network, self.pemma["schedule"], self.num_epochs)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """UNETR has one output head: nothing to switch."""

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """As nnU-Net, but without test-time mirroring when the preset says so, and with patches cut at their
        final size when the preset turns spatial augmentation off (as nnUNetTrainerNoDA)."""
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not self.pemma["schedule"].get("test_time_mirroring", True):
            self.inference_allowed_mirroring_axes = None
        if not self.augmentation.spatial:
            initial_patch_size = self.configuration_manager.patch_size
        return rotation, dummy_2d, initial_patch_size, mirror_axes

    def get_training_transforms(self, *args, **kwargs):
        """nnU-Net's training transforms, less the groups the preset's data_augmentation section turns off.
        (An instance method where nnU-Net's is static: nnU-Net calls it through self.)"""
        return select_transforms(nnUNetTrainer.get_training_transforms(*args, **kwargs), self.augmentation)


class AdaptingTrainer(UNETRTrainer):
    """Starts from a trained model (`-pretrained_weights`) and changes the network once its weights are in.

    nnU-Net's loader asserts that every key of the network is in the file, so when the file holds a CT UNETR the
    trainer builds that CT UNETR first (`_build_ct_base`) and converts it after loading (`convert`). The class's
    own build_network_architecture, what nnUNetv2_predict and resumed runs use, builds the converted network.
    """

    # preset "adaptation" values this trainer variant overrides (recorded in its plans.json and checkpoints)
    adaptation_overrides: dict[str, Any] = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        for key, value in self.adaptation_overrides.items():
            self._set_pemma("adaptation", key, value)
        self._adapted = False
        self._weights_loaded = False
        self._from_ct_base = False

    def expected_checkpoint(self, path: str) -> str:
        """Which kind of checkpoint `path` must be ("ct_base", "pemma", "early_fusion")."""
        return "ct_base"

    def convert(self, ct_base: nn.Module) -> nn.Module:
        """The network to train, made from the loaded CT UNETR."""
        raise NotImplementedError

    def freeze(self, network: nn.Module) -> None:
        """Select the trainable parameters (all by default)."""

    def _build_ct_base(self, plans_manager, configuration_manager, num_input_channels: int,
                       num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return build_plain_network(self.pemma, 1, num_output_channels, configuration_manager.patch_size)

    def initialize(self):
        pretrained = pretrained_weights_in_flight()
        if pretrained is not None:
            expect = self.expected_checkpoint(pretrained)
            theirs = check_compatible(pretrained, self.pemma, self.configuration_manager.patch_size, expect=expect)
            self._set_pemma(None, "modality_normalization", inherit_modality_normalization(self.pemma, theirs))
            self._from_ct_base = expect == "ct_base"
            if self._from_ct_base:
                self.build_network_architecture = self._build_ct_base
        super().initialize()
        _unwrap(self.network).register_load_state_dict_post_hook(self._note_weights_loaded)

    def _note_weights_loaded(self, module: nn.Module, incompatible_keys) -> None:
        self._weights_loaded = True

    def _adapt(self) -> None:
        """Convert (when starting from the CT base), freeze, and rebuild the optimiser and DDP wrapper."""
        network = _unwrap(self.network)
        if self._from_ct_base:
            network = self.convert(network)
        self.freeze(network)
        network = network.to(self.device)
        if self.is_ddp:
            # a modality absent from the data leaves its parameters without gradient
            network = DDP(network, device_ids=[self.local_rank] if self.device.type == "cuda" else None,
                          find_unused_parameters=True)
        self.network = network
        self.optimizer, self.lr_scheduler = self.configure_optimizers()
        self._adapted = True

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        if not self._adapted:
            if not self._weights_loaded:
                raise CheckpointError(f"{type(self).__name__} adapts a trained model: pass -pretrained_weights "
                                      f"<.../fold_X/checkpoint_final.pth>")
            self._adapt()
        super().on_train_start()

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not self.was_initialized:
            self.initialize()
        if not self._adapted:
            self._adapt()  # a resumed or validated checkpoint already holds the converted network
        super().load_checkpoint(filename_or_checkpoint)


class PEMMATrainer(AdaptingTrainer):
    """CT UNETR -> CT+PET: PET tokens, a PET input skip and LoRA on Q/V train; the CT base stays frozen.

    Start it with `-pretrained_weights <UNETRTrainer checkpoint_final.pth>`. Next to checkpoint_final.pth it
    writes the trained weights alone (adapter_final.safetensors).
    """

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return build_pemma_network(pemma_config(configuration_manager), num_output_channels,
                                   configuration_manager.patch_size)

    def convert(self, ct_base: nn.Module) -> nn.Module:
        adapted = type(self).build_network_architecture(self.plans_manager, self.configuration_manager,
                                                        self.num_input_channels,
                                                        self.label_manager.num_segmentation_heads)
        adapted.load_base_state_dict(ct_base.state_dict())
        return adapted

    def freeze(self, network: nn.Module) -> None:
        freeze_for_adaptation(network)

    def on_train_end(self):
        super().on_train_end()
        if self.local_rank == 0:
            save_adapter(_unwrap(self.network).state_dict(), Path(self.output_folder) / ADAPTER_FILE,
                         trainer_name=type(self).__name__, configuration=self.configuration_name,
                         plans=self.plans_manager.plans, dataset_json=self.dataset_json,
                         mirroring_axes=self.inference_allowed_mirroring_axes)


class PEMMAContinualTrainer(PEMMATrainer):
    """Updates a PEMMA model on a dataset with both or only one modality: only the LoRA matrices train.

    Start it with `-pretrained_weights <PEMMATrainer checkpoint_final.pth>`; a missing modality is zero.
    """

    def expected_checkpoint(self, path: str) -> str:
        return "pemma"

    def freeze(self, network: nn.Module) -> None:
        freeze_for_continual(network)


class PEMMADoRATrainer(PEMMATrainer):
    """PEMMA with DoRA (weight-decomposed low-rank adaptation) on Q and V instead of LoRA."""

    adaptation_overrides = {"method": "dora"}


class PEMMADoRAContinualTrainer(PEMMAContinualTrainer):
    """Continual update of a PEMMA-DoRA model: only the DoRA matrices and magnitudes train."""

    adaptation_overrides = {"method": "dora"}


class EarlyFusionTrainer(AdaptingTrainer):
    """Baseline (paper section 2.1): the CT UNETR's patch embedding and input skip widened to (CT, PET) channels,
    then the whole model trains. From an early-fusion checkpoint on a one-modality dataset it fine-tunes with the
    absent channel zero, which is how the forgetting PEMMA avoids is measured."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return build_early_fusion_unetr(pemma_config(configuration_manager), num_output_channels,
                                        configuration_manager.patch_size)

    def expected_checkpoint(self, path: str) -> str:
        return "ct_base" if input_channels(load_checkpoint_file(path)) == 1 else "early_fusion"

    def convert(self, ct_base: nn.Module) -> nn.Module:
        fused = type(self).build_network_architecture(self.plans_manager, self.configuration_manager,
                                                      self.num_input_channels,
                                                      self.label_manager.num_segmentation_heads)
        fused.load_state_dict(widen_to_two_channels(ct_base.state_dict(), fused.state_dict(),
                                                    self.pemma["adaptation"]["pet_init"]))
        return fused


class SwinUNETRTrainer(UNETRTrainer):
    """MONAI SwinUNETR from the plans preset (e.g. `--preset swin`): the CT base of the Swin variant."""

    architecture = "SwinUNETR"


class PEMMASwinTrainer(PEMMATrainer):
    """PEMMA on SwinUNETR: a PET patch embedding fused with CT's by a 1x1x1 convolution before the Swin stages,
    a PET input skip and LoRA/DoRA (the preset's adaptation.method) on every window attention's qkv."""

    architecture = "SwinUNETR"


class PEMMASwinContinualTrainer(PEMMAContinualTrainer):
    """Continual update of a PEMMA SwinUNETR: only the LoRA/DoRA parameters train."""

    architecture = "SwinUNETR"


class PEMMATrainer_zeroinit(PEMMATrainer):
    """PEMMA with the PET patch embedding and skip initialised to zero."""

    adaptation_overrides = {"pet_init": "zero"}


class PEMMATrainer_randominit(PEMMATrainer):
    """PEMMA with a randomly initialised PET patch embedding and skip."""

    adaptation_overrides = {"pet_init": "random"}


class EarlyFusionTrainer_zeroinit(EarlyFusionTrainer):
    """Early fusion with the PET channel's weights initialised to zero."""

    adaptation_overrides = {"pet_init": "zero"}


class EarlyFusionTrainer_randominit(EarlyFusionTrainer):
    """Early fusion with randomly initialised PET channel weights."""

    adaptation_overrides = {"pet_init": "random"}


class EarlyFusionTrainer_crossinit(EarlyFusionTrainer):
    """Early fusion with the PET channel's weights copied from the CT channel (cross-modal)."""

    adaptation_overrides = {"pet_init": "cross"}


class PEMMATrainer_noModalityDropout(PEMMATrainer):
    """PEMMA adapted on CT+PET inputs only (no random C / P / CP patterns), as in the MICCAI paper's text."""

    adaptation_overrides = {"modality_dropout": None}


class PEMMATrainer_modalityDropout(PEMMATrainer):
    """PEMMA adapted on random CT+PET / CT / PET input patterns (0.5 / 0.25 / 0.25), as PEMMA's official code."""

    adaptation_overrides = {"modality_dropout": [0.5, 0.25, 0.25]}
