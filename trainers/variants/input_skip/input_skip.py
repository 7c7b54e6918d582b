"""Continual updates that also adapt the CT input skip, whatever the preset says."""

from __future__ import annotations

from nnunetv2_pemma.trainers.adaptation.pemma import PEMMAContinualTrainer


class PEMMAContinualTrainer_inputSkip(PEMMAContinualTrainer):
    """A continual update that trains a conv LoRA on the CT input skip next to the qkv LoRA: it learns a new
    centre whose CT differs at the voxel level (contrast), and forgets more of the earlier centres' CT (README,
    "Updates that learn a new centre")."""

    adaptation_overrides = {"input_skip_adapter": True}
