"""PEMMA on nnU-Net's U-Net with trained shifts of the frozen norms' scale and bias, whatever the preset says."""

from __future__ import annotations

from nnunetv2_pemma.trainers.adaptation.pemma_cnn import PEMMACNNTrainer


class PEMMACNNTrainer_trainNorms(PEMMACNNTrainer):
    """PEMMACNNTrainer that also trains a shift of every instance norm's scale and bias (AdaBN-style; the base's
    norm parameters stay frozen and bit-identical), measured against frozen norms in benchmarks/pemma_cnn.py. The
    shifts act on every input, so the conv adapters are shared by all inputs too (no CT-only pair)."""

    adaptation_overrides = {"train_norms": True, "ct_only_adapters": False}
