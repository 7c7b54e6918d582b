"""Slice interaction module (SIM) of the 2.5D multimodal slice interaction network for PET/CT (Luo et al., 2025,
arXiv:2509.22841), in front of nnU-Net's 2-D U-Net.

The network sees k neighbouring slices of M modalities as M * k channels (modality-major, see
`nnunetv2_pemma.training.slice_stacking`) and predicts the centre slice. The paper describes the SIM as channel and
spatial attention branches over depthwise convolutions that learn slice-to-slice dependencies; the channel branch
weighs every neighbouring slice of every modality, the spatial branch says where, per modality.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class SliceInteractionModule(nn.Module):
    """Re-weights the M * k slice channels of a 2.5D input by channel and spatial attention.

    d = LeakyReLU(InstanceNorm(depthwise 3x3 conv(x))) keeps every slice channel separate; the output is
    x + d * channel_weights * spatial_weights, a residual, so an untrained SIM passes the slices through.
    """

    def __init__(self, modalities: int, slices: int, reduction: int = 2, spatial_kernel: int = 7) -> None:
        super().__init__()
        if modalities < 1 or slices < 1 or reduction < 1:
            raise ValueError(f"modalities, slices and reduction must be positive, got {modalities}, {slices}, "
                             f"{reduction}")
        if spatial_kernel < 1 or spatial_kernel % 2 == 0:
            raise ValueError(f"spatial_kernel must be a positive odd size (same-size maps), got {spatial_kernel}")
        self.modalities, self.slices = modalities, slices
        channels = modalities * slices
        self.depthwise = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels),
            nn.InstanceNorm2d(channels, affine=True),
            nn.LeakyReLU(inplace=True),
        )
        hidden = max(channels // reduction, 2)
        self.channel_attention = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels), nn.Sigmoid())
        self.spatial_attention = nn.Sequential(
            nn.Conv2d(channels, channels, spatial_kernel, padding=spatial_kernel // 2, groups=channels),
            nn.Conv2d(channels, modalities, 1, groups=modalities),  # one map per modality from its k slices
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, M * k, H, W) -> (B, M * k, H, W)."""
        d = self.depthwise(x)
        channel_weights = self.channel_attention(d.mean(dim=(2, 3)))[:, :, None, None]  # (B, M * k, 1, 1)
        spatial_weights = self.spatial_attention(d).repeat_interleave(self.slices, dim=1)  # (B, M * k, H, W)
        return x + d * channel_weights * spatial_weights


class SliceInteractionNet(nn.Module):
    """A SIM in front of a 2-D U-Net built by nnU-Net (its PlainConvUNet of the 2d configuration, with
    modalities * slices input channels); returns what the U-Net returns (a tensor or the deep-supervision list)."""

    def __init__(self, unet: nn.Module, modalities: int, slices: int, reduction: int = 2,
                 spatial_kernel: int = 7) -> None:
        super().__init__()
        self.sim = SliceInteractionModule(modalities, slices, reduction, spatial_kernel)
        self.unet = unet

    @property
    def decoder(self) -> nn.Module:
        """The U-Net's decoder: nnU-Net's trainer switches deep supervision via network.decoder.deep_supervision."""
        return self.unet.decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """x: (B, M * k, H, W) -> logits (B, classes, H, W), or one per decoder stage under deep supervision."""
        return self.unet(self.sim(x))
