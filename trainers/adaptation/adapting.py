"""The common base of trainers that start from a trained model and change its network (PEMMA, early fusion)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from nnunetv2_pemma.config import PemmaBlock
from nnunetv2_pemma.errors import CheckpointError
from nnunetv2_pemma.networks.build import build_plain_network
from nnunetv2_pemma.training.checkpoints import (check_compatible, inherit_modality_normalization,
                                                 pretrained_weights_argument)
from nnunetv2_pemma.trainers.common import run_by_nnunetv2_train
from nnunetv2_pemma.trainers.network_architecture.transformers import UNETRTrainer


def unwrap(network: nn.Module) -> nn.Module:
    """The network inside nnU-Net's DDP and torch.compile wrappers."""
    if isinstance(network, DDP):
        network = network.module
    return network._orig_mod if isinstance(network, OptimizedModule) else network


class AdaptingTrainer(UNETRTrainer):
    """Starts from a trained model (`-pretrained_weights`) and changes the network once its weights are in.

    nnU-Net's loader asserts that every key of the network is in the file, so when the file holds another network
    (a CT base; a prognosis model gaining clinical data) the trainer holds that network (`network_to_load`) until
    the weights are loaded and converts it then (`convert`). The class's static build_network_architecture, what
    nnUNetv2_predict and resumed runs use, builds the converted network.
    """

    # preset "adaptation" values this trainer variant overrides (recorded in its plans.json and checkpoints)
    adaptation_overrides: dict[str, Any] = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        pretrained = pretrained_weights_argument() if run_by_nnunetv2_train() else None
        if pretrained is not None:  # a file that does not fit is refused before nnU-Net writes its output folder
            plans_manager = PlansManager(plans)
            configuration_manager = plans_manager.get_configuration(configuration)
            block = PemmaBlock.of(configuration_manager)
            if block.model.architecture == self.architecture:  # else UNETRTrainer names the mismatch
                self.check_pretrained(pretrained, self.expected_checkpoint(pretrained), self.with_overrides(block),
                                      plans_manager, configuration_manager)
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.adaptation_overrides:
            self._set_pemma(self.with_overrides(self.pemma))
        self._adapted = False
        self._weights_loaded = False
        self._converting = False
        self._pretrained: str | None = None

    def inherit(self, theirs: dict[str, Any]) -> PemmaBlock:
        """This run's block, given the "pemma" block of the `-pretrained_weights` checkpoint: by default the
        normalisation of the modalities this dataset lacks (PET after a CT-only update), so the updated model still
        takes every modality it was adapted to."""
        return dataclasses.replace(self.pemma, modality_normalization=inherit_modality_normalization(self.pemma,
                                                                                                     theirs))

    @classmethod
    def expected_checkpoint(cls, path: str) -> str:
        """Which kind of checkpoint `path` must be ("ct_base", "pemma", "early_fusion")."""
        return "ct_base"

    @classmethod
    def check_pretrained(cls, path: str, expect: str, block: PemmaBlock, plans_manager: PlansManager,
                         configuration_manager: ConfigurationManager) -> dict[str, Any]:
        """The "pemma" block of the `-pretrained_weights` file, expected to be of kind `expect`, for this run's
        `block`; CheckpointError naming what keeps it from fitting."""
        return check_compatible(path, block, configuration_manager.patch_size, expect=expect)

    @classmethod
    def with_overrides(cls, block: PemmaBlock) -> PemmaBlock:
        """`block` with this trainer variant's ``adaptation_overrides``."""
        if not cls.adaptation_overrides:
            return block
        return dataclasses.replace(block, adaptation=dataclasses.replace(block.adaptation, **cls.adaptation_overrides))

    def network_to_load(self, expect: str) -> nn.Module | None:
        """The network a `-pretrained_weights` file of kind `expect` loads into when it is not the one this trainer
        trains (`convert` turns it into that); None when the file loads into the trained network as it is."""
        if expect != "ct_base":
            return None
        return build_plain_network(self.pemma, 1, self.label_manager.num_segmentation_heads,
                                   self.configuration_manager.patch_size)

    def convert(self, loaded: nn.Module) -> nn.Module:
        """The network to train, made from the `network_to_load` nnU-Net loaded the weights into."""
        raise NotImplementedError

    def freeze(self, network: nn.Module) -> None:
        """Select the trainable parameters (all by default)."""

    def start_from(self, loaded: nn.Module, path: str) -> None:
        """Called once with the network nnU-Net loaded `-pretrained_weights` (`path`) into, before it is converted
        and frozen (nothing by default)."""

    def _adapted_network(self) -> nn.Module:
        return type(self).build_network_architecture(self.plans_manager, self.configuration_manager,
                                                     self.num_input_channels,
                                                     self.label_manager.num_segmentation_heads)

    def initialize(self):
        pretrained = None if self.was_initialized else pretrained_weights_argument()
        if pretrained is not None:
            expect = self.expected_checkpoint(pretrained)
            theirs = self.check_pretrained(pretrained, expect, self.pemma, self.plans_manager,
                                           self.configuration_manager)
            self._set_pemma(self.inherit(theirs))
            self._pretrained = pretrained
        super().initialize()
        held = None if pretrained is None else self.network_to_load(expect)
        if held is not None:
            # what nnU-Net's load_pretrained_weights loads into, converted in _adapt
            self._converting = True
            held = held.to(self.device)
            self.network = DDP(held, device_ids=[self.local_rank]) if self.is_ddp else held
        unwrap(self.network).register_load_state_dict_post_hook(self._note_weights_loaded)

    def _note_weights_loaded(self, module: nn.Module, incompatible_keys) -> None:
        self._weights_loaded = True

    def _adapt(self) -> None:
        """Convert (when the weights went into `network_to_load`), freeze, and rebuild the optimiser and DDP
        wrapper."""
        network = unwrap(self.network)
        if self._converting:
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
            if self._pretrained is not None:
                self.start_from(unwrap(self.network), self._pretrained)
            self._adapt()
        super().on_train_start()

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not self.was_initialized:
            self.initialize()
        if not self._adapted:
            self._adapt()  # a resumed or validated checkpoint already holds the converted network
        super().load_checkpoint(filename_or_checkpoint)
