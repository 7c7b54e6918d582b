"""How the PET weights start: zero, random or copied from CT (the presets' default is cross-modal)."""

from __future__ import annotations

from nnunetv2_pemma.trainers.adaptation.pemma import PEMMATrainer
from nnunetv2_pemma.trainers.baselines.early_fusion import EarlyFusionTrainer


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
