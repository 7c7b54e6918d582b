"""The (CT, PET) channel layout of networks that take both modalities as input channels (early fusion, peers)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nnunetv2_pemma.config import MODALITIES


def fill_modality_channels(x: torch.Tensor, input_modalities: Sequence[str]) -> torch.Tensor:
    """(B, len(input_modalities), *rest) -> (B, 2, *rest) in (CT, PET) order, an absent modality zero: how a model
    trained on CT and PET takes C-only or P-only input (the paper's missing modality is a zero image)."""
    if x.shape[1] != len(input_modalities):
        raise ValueError(f"input has {x.shape[1]} channels, expected {len(input_modalities)} "
                         f"({tuple(input_modalities)})")
    full = x.new_zeros((x.shape[0], len(MODALITIES), *x.shape[2:]))
    for i, m in enumerate(input_modalities):
        full[:, MODALITIES.index(m)] = x[:, i]
    return full
