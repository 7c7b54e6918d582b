"""Whether PEMMA adapts on random CT+PET / CT / PET input patterns, whatever the preset says."""

from __future__ import annotations

from nnunetv2_pemma.trainers.adaptation.pemma import PEMMATrainer


class PEMMATrainer_noModalityDropout(PEMMATrainer):
    """PEMMA adapted on CT+PET inputs only (no random C / P / CP patterns), as in the MICCAI paper's text."""

    adaptation_overrides = {"modality_dropout": None}


class PEMMATrainer_modalityDropout(PEMMATrainer):
    """PEMMA adapted on random CT+PET / CT / PET input patterns (0.5 / 0.25 / 0.25), as PEMMA's official code."""

    adaptation_overrides = {"modality_dropout": [0.5, 0.25, 0.25]}
