"""PEMMA with context priors (``adaptation.method`` "prior"): learnable prior tokens per modality, chosen by which
modalities the input holds, next to LoRA on Q and V (``nnunetv2_pemma.adaptation.priors``); UNETR only."""

from __future__ import annotations

from nnunetv2_pemma.trainers.adaptation.pemma import PEMMAContinualTrainer, PEMMATrainer


class PEMMAPriorTrainer(PEMMATrainer):
    """CT base -> CT+PET: prior tokens (the preset's ``prior_entry``; default new tokens at every block), LoRA, the
    PET tokens and the PET input skip train; the CT base stays frozen."""

    adaptation_overrides = {"method": "prior"}


class PEMMAPriorFusionTrainer(PEMMATrainer):
    """Context priors entering through Hermes-style two-way attention after the blocks the decoder reads."""

    adaptation_overrides = {"method": "prior", "prior_entry": "fusion"}


class PEMMAPriorContinualTrainer(PEMMAContinualTrainer):
    """Continual update of a context-prior model: only the prior tokens (and fusion blocks) and the LoRA train."""

    adaptation_overrides = {"method": "prior"}
