"""nnU-Net trainers for PEMMA, found by nnU-Net through `nnUNet_extTrainer=<repo>/trainers`.

One small subclass per behaviour; networks, freezing and checks live in `nnunetv2_pemma`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_pemma.adaptation.adapter import ADAPTER_FILE, save_adapter
from nnunetv2_pemma.errors import CheckpointError
from nnunetv2_pemma.networks import freeze_for_adaptation, freeze_for_continual
from nnunetv2_pemma.plans import PEMMA_KEY
from nnunetv2_pemma.training.checkpoints import (check_compatible, inherit_modality_normalization,
                                                 pretrained_weights_in_flight)
from nnunetv2_pemma.training.config import epochs_from_schedule, pemma_config
from nnunetv2_pemma.training.networks import build_pemma_unetr, build_plain_unetr
from nnunetv2_pemma.training.optim import build_optimizer


def _unwrap(network: nn.Module) -> nn.Module:
    if isinstance(network, DDP):
        network = network.module
    return network._orig_mod if isinstance(network, OptimizedModule) else network


class UNETRTrainer(nnUNetTrainer):
    """MONAI UNETR from the plans preset (any number of input channels): no deep supervision, AdamW and the
    preset's iteration budget and learning-rate schedule."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.pemma = pemma_config(self.configuration_manager)
        schedule = self.pemma["schedule"]
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = \
            epochs_from_schedule(schedule)
        self.initial_lr = schedule["initial_lr"]
        self.weight_decay = schedule["weight_decay"]
        self.enable_deep_supervision = False

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return build_plain_unetr(pemma_config(configuration_manager), num_input_channels, num_output_channels,
                                 configuration_manager.patch_size)

    def configure_optimizers(self):
        return build_optimizer(self.network, self.pemma["schedule"], self.num_epochs)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """UNETR has one output head: nothing to switch."""


class PEMMATrainer(UNETRTrainer):
    """CT UNETR -> CT+PET: PET tokens, a PET input skip and LoRA on Q/V train; the CT base stays frozen.

    Start it with `-pretrained_weights <CT UNETR checkpoint_final.pth>`.
    """

    starts_from_ct_base = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._adapted = False
        self._weights_loaded = False
        if self.starts_from_ct_base:
            # nnU-Net's -pretrained_weights loader asserts that every key of the network is in the file, so
            # training builds the bare CT UNETR first and attaches the adapters once its weights are in. The class's
            # build_network_architecture (what nnUNetv2_predict calls) builds the adapted network.
            self.build_network_architecture = self._build_ct_base

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return build_pemma_unetr(pemma_config(configuration_manager), num_output_channels,
                                 configuration_manager.patch_size)

    def _build_ct_base(self, plans_manager, configuration_manager, num_input_channels: int,
                       num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return build_plain_unetr(self.pemma, 1, num_output_channels, configuration_manager.patch_size)

    @staticmethod
    def freeze(network: nn.Module) -> None:
        freeze_for_adaptation(network)

    def initialize(self):
        pretrained = pretrained_weights_in_flight()
        if pretrained is not None:
            theirs = check_compatible(pretrained, self.pemma, self.configuration_manager.patch_size,
                                      needs_adapters=not self.starts_from_ct_base)
            merged = inherit_modality_normalization(self.pemma, theirs)
            self.pemma["modality_normalization"] = merged
            self.plans_manager.plans["configurations"][self.configuration_name][PEMMA_KEY][
                "modality_normalization"] = merged
        super().initialize()
        _unwrap(self.network).register_load_state_dict_post_hook(self._note_weights_loaded)

    def _note_weights_loaded(self, module: nn.Module, incompatible_keys) -> None:
        self._weights_loaded = True

    def _adapt(self) -> None:
        """Attach the adapters (when starting from the CT base), freeze, and rebuild optimiser and DDP wrapper."""
        network = _unwrap(self.network)
        if self.starts_from_ct_base:
            adapted = type(self).build_network_architecture(self.plans_manager, self.configuration_manager,
                                                            self.num_input_channels,
                                                            self.label_manager.num_segmentation_heads)
            adapted.load_base_state_dict(network.state_dict())
            network = adapted
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
                                      f"<.../fold_X/checkpoint_final.pth> of a "
                                      f"{'UNETRTrainer (CT)' if self.starts_from_ct_base else 'PEMMATrainer'} run")
            self._adapt()
        super().on_train_start()

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not self.was_initialized:
            self.initialize()
        if not self._adapted:
            self._adapt()  # a resumed or validated checkpoint holds the adapted network
        super().load_checkpoint(filename_or_checkpoint)

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

    starts_from_ct_base = False

    @staticmethod
    def freeze(network: nn.Module) -> None:
        freeze_for_continual(network)
