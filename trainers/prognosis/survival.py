"""Prognosis (extended PEMMA paper): a Cox survival head trained jointly with segmentation, adapted stage by stage.

CT base (SurvivalUNETRTrainer) -> CT+PET (PEMMASurvivalTrainer: PET tokens, PET skip, LoRA/DoRA; base and head
frozen) -> CT+PET+clinical (PEMMAClinicalTrainer: a clinical token and the qkv adapters; all else frozen). The
early-fusion comparison widens the input (EarlyFusionSurvivalTrainer), then feeds the clinical vector to the head
(EarlyFusionClinicalTrainer), training everything. Endpoints and clinical rows come from the dataset's
outcomes.json (`pemma convert-hecktor --with-outcomes`), looked up by the case keys of nnU-Net's batches.
"""

from __future__ import annotations

import torch
from torch import nn

from nnunetv2_pemma.config import PemmaBlock
from nnunetv2_pemma.data.outcomes import Outcomes, dataset_outcomes
from nnunetv2_pemma.errors import CheckpointError, InputDataError
from nnunetv2_pemma.networks.build import (build_survival_early_fusion, build_survival_network,
                                           build_survival_pemma)
from nnunetv2_pemma.networks.prognosis import SurvivalHead
from nnunetv2_pemma.trainers.adaptation.adapting import unwrap
from nnunetv2_pemma.trainers.adaptation.pemma import PEMMAContinualTrainer, PEMMATrainer
from nnunetv2_pemma.trainers.baselines.early_fusion import EarlyFusionTrainer
from nnunetv2_pemma.trainers.common import run_by_nnunetv2_train
from nnunetv2_pemma.trainers.network_architecture.transformers import UNETRTrainer
from nnunetv2_pemma.training.checkpoints import load_checkpoint_file
from nnunetv2_pemma.training.survival_loss import SegmentationAndSurvivalLoss, batch_outcomes

HEAD_PREFIX = "prognosis."


def training_outcomes(dataset_name: str) -> Outcomes:
    """The dataset's outcomes, refused when no case has an endpoint to train the Cox loss on."""
    outcomes = dataset_outcomes(dataset_name)
    if not any(outcomes.endpoint(k) is not None for k in outcomes.cases):
        raise InputDataError(f"no case of {dataset_name} has a relapse-free survival endpoint in its outcomes.json: "
                             f"prognosis trainers need HECKTOR's Task-2 cases")
    return outcomes


class SurvivalTraining:
    """Mixin (first in the bases): nnU-Net's segmentation loss plus the preset's weight times the Cox loss, with
    each batch's endpoints and clinical vectors looked up by ``batch["keys"]``, on patches that hold a lesion."""

    outcomes: Outcomes

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # the explicit signature matters: nnU-Net's __init__ records its arguments from this method's signature
        if run_by_nnunetv2_train():  # data without outcomes is refused before nnU-Net makes its output folder
            training_outcomes(plans["dataset_name"])
        super().__init__(plans, configuration, fold, dataset_json, device)
        # every patch holds a lesion (nnU-Net's foreground oversampling for all samples, not a third): the head
        # scores the tumour it sees, and predict-risk weights its tiles by the tumour they hold
        self.oversample_foreground_percent = 1.0

    def _build_loss(self):
        survival = self.pemma.survival
        return SegmentationAndSurvivalLoss(super()._build_loss(), survival.loss_weight, survival.ties)

    def on_train_start(self):
        self.outcomes = training_outcomes(self.plans_manager.dataset_name)
        super().on_train_start()

    def train_step(self, batch: dict) -> dict:
        clinical, targets = batch_outcomes(self.outcomes, batch["keys"])
        network = unwrap(self.network)
        network.set_clinical(clinical.to(self.device))
        self.loss.targets = targets.to(self.device)
        try:
            return super().train_step(batch)
        finally:
            network.set_clinical(None)
            self.loss.targets = None

    @classmethod
    def expected_checkpoint(cls, path: str) -> str:
        """As the adapted trainer's, once the file is known to hold a survival head (a segmentation-only model
        cannot start prognosis: its head would be random and frozen)."""
        weights = load_checkpoint_file(path)["network_weights"]
        if not any(k.startswith(HEAD_PREFIX) for k in weights):
            raise CheckpointError(f"{path} has no survival head ({HEAD_PREFIX}*): prognosis starts from a "
                                  f"SurvivalUNETRTrainer checkpoint (the CT base trained with segmentation and "
                                  f"survival) and continues from the previous prognosis stage")
        return super().expected_checkpoint(path)


class SurvivalUNETRTrainer(SurvivalTraining, UNETRTrainer):
    """The CT base of prognosis: MONAI UNETR with a survival head, segmentation and Cox loss trained together."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return build_survival_network(PemmaBlock.of(configuration_manager), num_input_channels, num_output_channels,
                                      configuration_manager.patch_size)


def _survival_ct_base(trainer: UNETRTrainer) -> nn.Module:
    return build_survival_network(trainer.pemma, 1, trainer.label_manager.num_segmentation_heads,
                                  trainer.configuration_manager.patch_size)


class PEMMASurvivalTrainer(SurvivalTraining, PEMMATrainer):
    """Prognosis CT -> CT+PET: PET tokens, PET skip and LoRA train; the CT base and its survival head are frozen.
    Start it with `-pretrained_weights <SurvivalUNETRTrainer checkpoint_final.pth>`."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return build_survival_pemma(PemmaBlock.of(configuration_manager), num_output_channels,
                                    configuration_manager.patch_size, clinical=False)

    def network_to_load(self, expect: str) -> nn.Module | None:
        return _survival_ct_base(self) if expect == "ct_base" else None


class PEMMASurvivalDoRATrainer(PEMMASurvivalTrainer):
    """PEMMASurvivalTrainer with DoRA on Q and V."""

    adaptation_overrides = {"method": "dora"}


class PEMMAClinicalTrainer(SurvivalTraining, PEMMAContinualTrainer):
    """Prognosis CT+PET -> CT+PET+clinical: a clinical token and the qkv adapters train; the CT base, the head
    and the PET branch stay as they were. Start it with `-pretrained_weights <PEMMASurvivalTrainer
    checkpoint_final.pth>`; a case without a clinical row gets the missing-row encoding."""

    stage = "clinical"

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return build_survival_pemma(PemmaBlock.of(configuration_manager), num_output_channels,
                                    configuration_manager.patch_size, clinical=True)

    def network_to_load(self, expect: str) -> nn.Module | None:
        return build_survival_pemma(self.pemma, self.label_manager.num_segmentation_heads,
                                    self.configuration_manager.patch_size, clinical=False)

    def convert(self, loaded: nn.Module) -> nn.Module:
        network = self._adapted_network()
        missing, unexpected = network.load_state_dict(loaded.state_dict(), strict=False)
        if unexpected or any(not k.startswith("ehr_") for k in missing):
            raise CheckpointError(f"{self._pretrained}: not a CT+PET prognosis model this trainer can extend "
                                  f"(unexpected {unexpected[:3]}, missing {missing[:3]})")
        return network


class PEMMADoRAClinicalTrainer(PEMMAClinicalTrainer):
    """PEMMAClinicalTrainer after PEMMASurvivalDoRATrainer."""

    adaptation_overrides = {"method": "dora"}


class EarlyFusionSurvivalTrainer(SurvivalTraining, EarlyFusionTrainer):
    """Prognosis early fusion: the CT base's input layers widened to CT and PET, then everything trains."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return build_survival_early_fusion(PemmaBlock.of(configuration_manager), num_output_channels,
                                           configuration_manager.patch_size, clinical=False)

    def network_to_load(self, expect: str) -> nn.Module | None:
        return _survival_ct_base(self) if expect == "ct_base" else None


class EarlyFusionClinicalTrainer(EarlyFusionSurvivalTrainer):
    """Prognosis early fusion + clinical: the clinical vector joins the pooled tokens before the head (its new
    weights start at zero), then everything trains. Start it from an EarlyFusionSurvivalTrainer checkpoint."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return build_survival_early_fusion(PemmaBlock.of(configuration_manager), num_output_channels,
                                           configuration_manager.patch_size, clinical=True)

    @classmethod
    def expected_checkpoint(cls, path: str) -> str:
        kind = super().expected_checkpoint(path)
        if kind != "early_fusion":
            raise CheckpointError(f"{path} is a CT-only model; EarlyFusionClinicalTrainer continues from an "
                                  f"EarlyFusionSurvivalTrainer checkpoint")
        return kind

    def network_to_load(self, expect: str) -> nn.Module | None:
        return build_survival_early_fusion(self.pemma, self.label_manager.num_segmentation_heads,
                                           self.configuration_manager.patch_size, clinical=False)

    def convert(self, loaded: nn.Module) -> nn.Module:
        network = self._adapted_network()
        state = loaded.state_dict()
        state.update(SurvivalHead.widened(loaded.prognosis, network.prognosis.clinical_features).state_dict(
            prefix=HEAD_PREFIX))
        network.load_state_dict(state)
        return network
