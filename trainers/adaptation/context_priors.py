"""PEMMA with context priors (``adaptation.method`` "prior"): learnable prior tokens per modality, chosen by which
modalities the input holds, next to LoRA on Q and V (``nnunetv2_pemma.adaptation.priors``); UNETR only."""

from __future__ import annotations

from nnunetv2_pemma.trainers.adaptation.pemma import PEMMAContinualTrainer, PEMMATrainer


class PEMMAPriorTrainer(PEMMATrainer):
    """CT base -> CT+PET: prior tokens (the preset's ``prior_entry``; default Hermes-style two-way fusion after the
    blocks the decoder reads), LoRA, the PET tokens and the PET input skip train; the CT base stays frozen."""

    adaptation_overrides = {"method": "prior"}


class PEMMAPriorTokensTrainer(PEMMATrainer):
    """Context priors entering as new prior tokens at every block (prompt tuning) instead of through fusion."""

    adaptation_overrides = {"method": "prior", "prior_entry": "tokens"}


class PEMMAPriorContinualTrainer(PEMMAContinualTrainer):
    """Continual update of a context-prior model: only the prior tokens (and fusion blocks) and the LoRA train."""

    adaptation_overrides = {"method": "prior"}
