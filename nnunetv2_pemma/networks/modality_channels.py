"""The (CT, PET) channel layout of networks that take both modalities as input channels (early fusion, peers,
nnU-Net's U-Net trained from scratch or fine-tuned on CT+PET)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nnunetv2_pemma.config import MODALITIES
from nnunetv2_pemma.networks.class_extension import extend_class
from nnunetv2_pemma.networks.modality_slots import check_modalities, sample_modality_masks


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


class ModalityChannels(nn.Module):
    """A network over (CT, PET) input channels, fed the dataset's channels (`input_modalities`, in order).

    With `slices` > 1 each modality arrives as that many neighbouring slices (a 2.5D network): the input is
    (B, len(input_modalities) * slices, H, W), modality-major, and the network gets (B, 2 * slices, H, W).
    """

    def __init__(self, network: nn.Module, input_modalities: Sequence[str], slices: int = 1) -> None:
        super().__init__()
        self.network = network
        self.slices = slices
        self.set_input_modalities(input_modalities)

    def set_input_modalities(self, modalities: Sequence[str]) -> None:
        """Declare which modalities the input channels hold, in order (C, P or CP inference)."""
        self.input_modalities = check_modalities(modalities)

    def set_deep_supervision(self, enabled: bool) -> None:
        """H2ASeg switches deep supervision on itself, nnU-Net's U-Nets on their decoder."""
        switch = self.network if hasattr(self.network, "deep_supervision") else self.network.decoder
        switch.deep_supervision = enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.slices == 1:
            return self.network(fill_modality_channels(x, self.input_modalities))
        expected = len(self.input_modalities) * self.slices
        if x.shape[1] != expected:
            raise ValueError(f"a 2.5D network takes {self.slices} neighbouring slices of each of "
                             f"{list(self.input_modalities)} ({expected} channels), got {x.shape[1]}: nnU-Net's "
                             f"2-D sliding window passes single slices, predict with `pemma predict`")
        stacked = x.reshape(x.shape[0], len(self.input_modalities), self.slices, *x.shape[2:])
        filled = fill_modality_channels(stacked, self.input_modalities)
        return self.network(filled.reshape(x.shape[0], -1, *x.shape[2:]))


class ModalityChannelInputs(nn.Module):
    """What a two-channel (CT, PET) nnU-Net U-Net becomes when it is fed the dataset's channels (mixin in front of
    its class, :func:`modality_channel_unet`): an absent modality is a zero channel, and in training with
    ``modality_dropout`` each sample keeps CT+PET, CT or PET (the other channel zeroed), the "blank channel"
    training of DeMoSeg and Zhao et al."""

    input_modalities: tuple[str, ...]
    modality_dropout: tuple[float, float, float] | None

    def set_input_modalities(self, modalities: Sequence[str]) -> None:
        """Declare which modalities the input channels hold, in order (C, P or CP inference)."""
        self.input_modalities = check_modalities(modalities)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """x: (B, len(input_modalities), *spatial) -> the U-Net's output for (B, 2, *spatial) in (CT, PET) order."""
        full = fill_modality_channels(x, self.input_modalities)
        if self.training and self.modality_dropout is not None:
            keep = torch.stack(sample_modality_masks(self.modality_dropout, x.shape[0]), dim=1)
            full = full * keep.view(*keep.shape, *([1] * (full.ndim - 2))).to(full)
        return super().forward(full)


def modality_channel_unet(unet: nn.Module, input_modalities: Sequence[str],
                          modality_dropout: Sequence[float] | None = None) -> nn.Module:
    """`unet` (built with 2 input channels) fed the dataset's channels, in place (:class:`ModalityChannelInputs`)."""
    extend_class(unet, ModalityChannelInputs)
    unet.modality_dropout = None if modality_dropout is None else tuple(modality_dropout)
    unet.set_input_modalities(input_modalities)
    return unet
