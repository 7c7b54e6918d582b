"""PEMMA with a mixture of LoRA experts on Q and V (``adaptation.method`` "moa"): one expert per centre, per input
pattern (C / P / CP) or chosen by a learned gate (``nnunetv2_pemma.adaptation.mixture``).

With centre routing, the adaptation stage trains one expert per centre of its dataset (and the PET modules); a
continual update adds an expert for each centre of its dataset the model lacks and trains only its dataset's
centres' experts, so every other expert and the base stay bit-identical. Each run writes, next to its adapter file,
one small file per expert it trained (``experts/<key>.safetensors``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2_pemma.adaptation.files import EXPERTS_FOLDER, save_expert
from nnunetv2_pemma.adaptation.mixture import expert_parameter_key, moa_layers
from nnunetv2_pemma.adaptation.provenance import BASE_FILE_KEY, PEMMA_BASE_KEY
from nnunetv2_pemma.config import Adaptation, PemmaBlock
from nnunetv2_pemma.data.centers import center_of
from nnunetv2_pemma.errors import CheckpointError
from nnunetv2_pemma.networks.build import build_pemma_network
from nnunetv2_pemma.trainers.adaptation.adapting import unwrap
from nnunetv2_pemma.trainers.adaptation.pemma import (PEMMAContinualTrainer, PEMMASwinContinualTrainer,
                                                      PEMMASwinTrainer, PEMMATrainer)


class MixtureTraining:
    """Mixin (first in the bases): each batch is routed by its cases' centres; the dataset's centres get experts.

    nnU-Net's final validation passes the network images only: when every validation case comes from one centre
    it is routed to that centre's expert, otherwise by the unknown-key rule (the average of the experts).
    """

    adaptation_overrides: dict[str, Any] = {"method": "moa"}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # the explicit signature matters: nnU-Net's __init__ records its arguments from this method's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._set_pemma(self.with_dataset_experts(self.pemma))

    def dataset_centers(self) -> tuple[str, ...]:
        """The centres of this dataset's cases (from nnU-Net's preprocessed folder), sorted."""
        folder = self.preprocessed_dataset_folder
        return tuple(sorted({center_of(k) for k in infer_dataset_class(folder).get_identifiers(folder)}))

    def with_dataset_experts(self, block: PemmaBlock) -> PemmaBlock:
        """Centre routing: `block` with an expert for every centre of this dataset (after the ones it has)."""
        adaptation = block.adaptation
        if adaptation.moa_routing != "center":
            return block
        experts = adaptation.moa_experts + tuple(c for c in self.dataset_centers() if c not in adaptation.moa_experts)
        return dataclasses.replace(block, adaptation=dataclasses.replace(adaptation, moa_experts=experts))

    def trained_experts(self) -> tuple[str, ...] | None:
        """The experts this run trains; None: every expert (modality and gate routing, whose data reach them all)."""
        return self.dataset_centers() if self.pemma.adaptation.moa_routing == "center" else None

    def freeze(self, network: nn.Module) -> None:
        super().freeze(network)
        trained = self.trained_experts()
        if trained is not None:
            for name, p in network.named_parameters():
                if expert_parameter_key(name) not in (None, *trained):
                    p.requires_grad_(False)

    def train_step(self, batch: dict) -> dict:
        unwrap(self.network).set_centers([center_of(k) for k in batch["keys"]])
        return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        unwrap(self.network).set_centers([center_of(k) for k in batch["keys"]])
        return super().validation_step(batch)

    def perform_actual_validation(self, save_probabilities: bool = False):
        _, val_keys = self.do_split()
        centers = {center_of(k) for k in val_keys}
        unwrap(self.network).set_centers(centers.pop() if len(centers) == 1 else None)
        return super().perform_actual_validation(save_probabilities)

    def on_train_end(self):
        super().on_train_end()
        if self.local_rank == 0:
            network = unwrap(self.network)
            state = network.state_dict()
            for key in self.trained_experts() or moa_layers(network)[0].keys:
                save_expert(state, key, Path(self.output_folder) / EXPERTS_FOLDER,
                            trainer_name=type(self).__name__, configuration=self.configuration_name,
                            plans=self.plans_manager.plans, dataset_json=self.dataset_json,
                            mirroring_axes=self.inference_allowed_mirroring_axes,
                            base_file=self.my_init_kwargs.get(PEMMA_BASE_KEY, {}).get(BASE_FILE_KEY))


class PEMMAMoATrainer(MixtureTraining, PEMMATrainer):
    """CT base -> CT+PET with a mixture of LoRA experts routed by the preset's ``moa_routing`` (default: one
    expert per centre of the dataset), the PET tokens and the PET input skip; the CT base stays frozen."""


class PEMMAMoAModalityTrainer(PEMMAMoATrainer):
    """The mixture routed by the input pattern: one expert each for CP, C and P inputs (modality dropout feeds
    the C and P experts)."""

    adaptation_overrides = {"method": "moa", "moa_routing": "modality"}


class PEMMAMoAGateTrainer(PEMMAMoATrainer):
    """The mixture with a learned top-1 gate per attention layer over ``moa_gate_experts`` experts."""

    adaptation_overrides = {"method": "moa", "moa_routing": "gate"}


class MixtureUpdate(MixtureTraining):
    """Mixin (first in the bases) of a continual trainer: routing and experts as the checkpoint's, plus an expert
    for each new centre of this dataset (centre routing), which `convert` adds to the loaded network."""

    _their_experts: tuple[str, ...] = ()

    def inherit(self, theirs: dict[str, Any]) -> PemmaBlock:
        self._their_experts = Adaptation.parse(theirs["adaptation"]).moa_experts
        return self.with_dataset_experts(super().inherit(theirs))

    def network_to_load(self, expect: str) -> nn.Module | None:
        """The checkpoint's own network when this dataset brings new centres (`convert` adds their experts)."""
        if self.pemma.adaptation.moa_experts == self._their_experts:
            return None
        their = dataclasses.replace(self.pemma, adaptation=dataclasses.replace(
            self.pemma.adaptation, moa_experts=self._their_experts))
        return build_pemma_network(their, self.label_manager.num_segmentation_heads,
                                   self.configuration_manager.patch_size)

    def convert(self, loaded: nn.Module) -> nn.Module:
        network = self._adapted_network()
        missing, unexpected = network.load_state_dict(loaded.state_dict(), strict=False)
        if unexpected or any(expert_parameter_key(k) is None for k in missing):
            raise CheckpointError(f"{self._pretrained}: not a mixture model this trainer can extend "
                                  f"(unexpected {unexpected[:3]}, missing {missing[:3]})")
        return network


class PEMMAMoAContinualTrainer(MixtureUpdate, PEMMAContinualTrainer):
    """Continual update of a mixture model (routing and experts as the checkpoint's): with centre routing it adds
    an expert for each new centre of this dataset and trains only this dataset's centres' experts; with modality or
    gate routing every expert (and the gate) trains. Start it with `-pretrained_weights <PEMMAMoATrainer or
    PEMMAMoAContinualTrainer checkpoint_final.pth>`."""


class PEMMASwinMoATrainer(MixtureTraining, PEMMASwinTrainer):
    """The mixture on SwinUNETR (every window attention's qkv): one expert per centre by default."""


class PEMMASwinMoAContinualTrainer(MixtureUpdate, PEMMASwinContinualTrainer):
    """Continual update of a SwinUNETR mixture model, as PEMMAMoAContinualTrainer."""
