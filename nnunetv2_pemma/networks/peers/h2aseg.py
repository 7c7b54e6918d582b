"""H2ASeg (Lu et al., MICCAI 2024): a dual-branch residual 3-D U-Net for PET/CT with Modality-Cooperative Spatial
Attention (MCSA) at every encoder level and Target-Aware Modality Weighting (TAMW) in the decoder.

Written from the paper (sections 2.1-2.3), not from the authors' code. What the paper specifies: separate CT and PET
encoders of residual blocks; at every level MCSA (inter-window then intra-window Bi-Directional Spatial Attention,
BDSA, eq. 1) exchanges information between the modalities and feeds the next encoder level; the decoder
concatenates both modalities' MCSA outputs with the up-sampled deeper decoder output, re-weights them with TAMW
(eq. 2-4) using the deeper level's prediction, and predicts at every level (deep supervision, weights of eq. 5).

Where the paper is silent we chose: MONAI's UnetResBlock as the residual block (stride-2 convolution for
down-sampling), residual connections around BDSA and around the inter-window step of MCSA, zero padding of MCSA
inputs to a multiple of the window (cropped back after), windows clipped to the feature size of small levels,
trilinear up-sampling to the exact skip size (so odd sizes work), and 1 - softmax(background) as the foreground
probability so that any number of classes >= 2 works. Axes are nnU-Net's (z, y, x).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock, UnetResBlock
from torch import Tensor

__all__ = [
    "H2ASEG_WIDTHS",
    "H2ASEG_WINDOW",
    "BiDirectionalSpatialAttention",
    "H2ASeg",
    "ModalityCooperativeSpatialAttention",
    "TargetAwareModalityWeighting",
    "level_weights",
    "level_windows",
]

H2ASEG_WIDTHS = (8, 16, 32, 64, 128)
"""Channels per modality at each level, as in the paper."""
H2ASEG_WINDOW = (4, 8, 8)
"""The paper's (8, 8, 4) H x W x D MCSA window, in nnU-Net's (z, y, x) axis order."""
_WEIGHT_BOUND = 1.0 - 1e-6
"""TAMW scales tanh by this so that a weight never reaches +-1 (tanh saturates to exactly 1 in float32): the factor
1 + p W_fore + (1 - p) W_back that eq. 4 applies to a voxel's feature then stays strictly inside (0, 2)."""


def level_weights(levels: int) -> list[float]:
    """Deep-supervision weights of the paper's eq. 5: level k (1 = full resolution) weighs (levels+1-k), i.e.
    (6-k) for 5 levels, normalised to sum 1, highest resolution first."""
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    total = levels * (levels + 1) / 2
    return [(levels + 1 - k) / total for k in range(1, levels + 1)]


def level_windows(patch_size: Sequence[int], levels: int, window: Sequence[int]) -> list[tuple[int, ...]]:
    """MCSA window of each level: the configured window, clipped per axis to the level's feature size
    (level k's size is ceil(patch / 2**(k-1)) per axis)."""
    if len(window) != len(patch_size):
        raise ValueError(f"window {tuple(window)} and patch size {tuple(patch_size)} differ in dimensions")
    if min(window) < 1 or min(patch_size) < 1:
        raise ValueError(f"window {tuple(window)} and patch size {tuple(patch_size)} must be positive")
    return [tuple(min(int(w), math.ceil(n / 2 ** (k - 1))) for w, n in zip(window, patch_size))
            for k in range(1, levels + 1)]


def _tokens(x: Tensor) -> Tensor:
    """(B, C, *spatial) -> (B, N, C) with N the number of voxels."""
    return x.flatten(2).transpose(1, 2)


class _UnidirectionalAttention(nn.Module):
    """One direction of BDSA: improves the target modality with attention to the source and to itself.

    1x1x1 convolutions give Q_s, Q_t, K_t, V_t from the target and K_s, V_s from the source (fused into one
    convolution per input). "cross" = attention(Q_s, K_s, V_s) and "self" = attention(Q_t, K_t, V_t), each
    single-head softmax(Q K^T / sqrt(C)) V over all voxels (the paper's eq. 1 calls the first A_self and the second
    A_cross; we name them by what they attend to). Their concatenation goes through a 3x3x3 convolution back to C
    channels, which is added to the target (the residual is our choice; the paper outputs the convolution).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.target_proj = nn.Conv3d(channels, 4 * channels, kernel_size=1)
        self.source_proj = nn.Conv3d(channels, 2 * channels, kernel_size=1)
        self.fuse = nn.Conv3d(2 * channels, channels, kernel_size=3, padding=1)

    def forward(self, target: Tensor, source: Tensor) -> Tensor:
        """target, source: (B, C, D, H, W) -> improved target (B, C, D, H, W)."""
        q_s, q_t, k_t, v_t = _tokens(self.target_proj(target)).chunk(4, dim=-1)
        k_s, v_s = _tokens(self.source_proj(source)).chunk(2, dim=-1)
        cross = F.scaled_dot_product_attention(q_s, k_s, v_s)
        own = F.scaled_dot_product_attention(q_t, k_t, v_t)
        fused = torch.cat((cross, own), dim=-1).transpose(1, 2).reshape(target.shape[0], -1, *target.shape[2:])
        return target + self.fuse(fused)


class BiDirectionalSpatialAttention(nn.Module):
    """BDSA (paper eq. 1): two parallel unidirectional attentions, CT as target with PET as source and PET as target
    with CT as source, each with its own weights. Each output is its target plus a correction (our residual)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.to_ct = _UnidirectionalAttention(channels)
        self.to_pet = _UnidirectionalAttention(channels)

    def forward(self, ct: Tensor, pet: Tensor) -> tuple[Tensor, Tensor]:
        """ct, pet: (B, C, D, H, W) -> improved (ct', pet'), same shapes."""
        return self.to_ct(ct, pet), self.to_pet(pet, ct)


def _window_partition(x: Tensor, window: Sequence[int]) -> Tensor:
    """(B, C, D, H, W), each size a multiple of the window -> windows (B * nWindows, C, *window)."""
    b, c, *size = x.shape
    (nd, wd), (nh, wh), (nw, ww) = ((n // w, w) for n, w in zip(size, window))
    x = x.reshape(b, c, nd, wd, nh, wh, nw, ww).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(-1, c, wd, wh, ww)


def _window_reverse(windows: Tensor, size: Sequence[int]) -> Tensor:
    """Inverse of _window_partition: (B * nWindows, C, *window) -> (B, C, *size)."""
    c, wd, wh, ww = windows.shape[1:]
    nd, nh, nw = (n // w for n, w in zip(size, (wd, wh, ww)))
    x = windows.reshape(-1, nd, nh, nw, c, wd, wh, ww).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(-1, c, *size)


class ModalityCooperativeSpatialAttention(nn.Module):
    """MCSA (paper 2.1): global then local interaction of the CT and PET features of one encoder level.

    Inter-window: a convolution with kernel = stride = window pools each window of each modality to one token, BDSA
    runs on the two token grids (long-range, cross-window), and the result is trilinearly up-sampled and added to
    the input (residual, our choice) -> E_hat. Intra-window: E_hat of both modalities is split into windows and a
    second BDSA (own weights) runs inside each window; its residual makes the output F = E_hat + correction.
    Inputs of any size are zero-padded on the high side to a multiple of the window (padded voxels are not masked)
    and cropped back.
    """

    def __init__(self, channels: int, window: Sequence[int]) -> None:
        super().__init__()
        if len(window) != 3 or min(window) < 1:
            raise ValueError(f"window must be three positive sizes, got {tuple(window)}")
        self.window = tuple(int(w) for w in window)
        self.pool_ct = nn.Conv3d(channels, channels, kernel_size=self.window, stride=self.window)
        self.pool_pet = nn.Conv3d(channels, channels, kernel_size=self.window, stride=self.window)
        self.inter = BiDirectionalSpatialAttention(channels)
        self.intra = BiDirectionalSpatialAttention(channels)

    def forward(self, ct: Tensor, pet: Tensor) -> tuple[Tensor, Tensor]:
        """ct, pet: (B, C, D, H, W) -> (F_ct, F_pet), same shapes."""
        size = ct.shape[2:]
        pad = [p for n, w in zip(reversed(size), reversed(self.window)) for p in (0, -n % w)]
        ct, pet = F.pad(ct, pad), F.pad(pet, pad)
        padded = ct.shape[2:]
        tokens_ct, tokens_pet = self.inter(self.pool_ct(ct), self.pool_pet(pet))
        ct = ct + F.interpolate(tokens_ct, size=padded, mode="trilinear", align_corners=False)
        pet = pet + F.interpolate(tokens_pet, size=padded, mode="trilinear", align_corners=False)
        ct, pet = self.intra(_window_partition(ct, self.window), _window_partition(pet, self.window))
        crop = (..., *(slice(0, n) for n in size))
        return _window_reverse(ct, padded)[crop], _window_reverse(pet, padded)[crop]


def _mlp(channels: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))


class TargetAwareModalityWeighting(nn.Module):
    """TAMW (paper eq. 2-4): per-channel weights in (-1, 1) that emphasise (> 0) or weaken (< 0) the channels of the
    concatenated multi-modal features, separately inside and outside the predicted foreground."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fore_mlp = _mlp(channels, hidden)
        self.back_mlp = _mlp(channels, hidden)

    @staticmethod
    def _bounded(z: Tensor) -> Tensor:
        """tanh at float32 or better (autocast gives half-precision MLP outputs), scaled strictly inside (-1, 1)."""
        return torch.tanh(z.to(torch.promote_types(z.dtype, torch.float32))) * _WEIGHT_BOUND

    def weights(self, features: Tensor, foreground: Tensor) -> tuple[Tensor, Tensor]:
        """features (B, C, D, H, W), foreground probability (B, 1, D, H, W) in [0, 1] -> (W_fore, W_back), each (B, C):
        tanh(MLP(GAP(foreground * features))) and tanh(MLP(GAP((1 - foreground) * features)))."""
        spatial = tuple(range(2, features.ndim))
        fore = (foreground * features).mean(spatial)
        back = ((1 - foreground) * features).mean(spatial)
        return self._bounded(self.fore_mlp(fore)), self._bounded(self.back_mlp(back))

    def forward(self, features: Tensor, foreground: Tensor) -> Tensor:
        """F + W_fore * F_fore + W_back * F_back (eq. 4), the shape of features."""
        w_fore, w_back = self.weights(features, foreground)
        expand = (..., *(None,) * (features.ndim - 2))
        return features + w_fore[expand] * (foreground * features) + w_back[expand] * ((1 - foreground) * features)


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False)


class H2ASeg(nn.Module):
    """H2ASeg: CT and PET encoders joined by MCSA at every level, a TAMW-refined decoder, a head at every level.

    Encoders (separate weights): level 1 a UnetResBlock 1 -> w_1, level k a stride-2 UnetResBlock w_{k-1} -> w_k
    (ceil(n / 2) voxels per axis); each level's outputs pass through that level's MCSA, and the next level encodes
    the MCSA outputs. Decoder: D_L = UnetResBlock on concat(F_ct^L, F_pet^L); for k = L-1 .. 1, D_{k+1} and the
    foreground probability of P_{k+1} are trilinearly resized to level k, F^k = concat(F_ct^k, F_pet^k, D~) is
    re-weighted by TAMW and D_k = UnetResBlock(F^k) -> 2 w_k channels. P_k = 1x1x1 head on D_k.

    Args:
        out_channels: segmentation classes including background (>= 2).
        patch_size: training patch (z, y, x); sets each level's MCSA window via level_windows.
        widths: channels per modality at each level (len = number of levels L).
        window: MCSA window (z, y, x) before clipping.
        norm_name: MONAI normalisation of the residual blocks.
        deep_supervision: return all L predictions (else only the full-resolution one); nnU-Net's trainer switches
            this attribute off for validation and inference.
    """

    def __init__(self, out_channels: int, patch_size: Sequence[int], widths: Sequence[int] = H2ASEG_WIDTHS,
                 window: Sequence[int] = H2ASEG_WINDOW, norm_name: str = "instance",
                 deep_supervision: bool = True) -> None:
        super().__init__()
        if out_channels < 2:
            raise ValueError(f"out_channels must count background and at least one class, got {out_channels}")
        if len(patch_size) != 3 or len(window) != 3:
            raise ValueError(f"patch size {tuple(patch_size)} and window {tuple(window)} must be 3-D")
        if len(widths) < 2:
            raise ValueError(f"H2ASeg needs at least two levels, got widths {tuple(widths)}")
        levels = len(widths)
        self.levels = levels
        self.deep_supervision = deep_supervision
        self.ct_encoder = self._encoder(widths, norm_name)
        self.pet_encoder = self._encoder(widths, norm_name)
        self.mcsa = nn.ModuleList(ModalityCooperativeSpatialAttention(w, win)
                                  for w, win in zip(widths, level_windows(patch_size, levels, window)))
        decoder_in = [2 * (widths[k] + widths[k + 1]) for k in range(levels - 1)] + [2 * widths[-1]]
        self.tamw = nn.ModuleList(TargetAwareModalityWeighting(c) for c in decoder_in[:-1])
        self.decoder = nn.ModuleList(UnetResBlock(3, c, 2 * w, kernel_size=3, stride=1, norm_name=norm_name)
                                     for c, w in zip(decoder_in, widths))
        self.heads = nn.ModuleList(UnetOutBlock(3, 2 * w, out_channels) for w in widths)

    @staticmethod
    def _encoder(widths: Sequence[int], norm_name: str) -> nn.ModuleList:
        return nn.ModuleList(UnetResBlock(3, c_in, c_out, kernel_size=3, stride=1 if k == 0 else 2, norm_name=norm_name)
                             for k, (c_in, c_out) in enumerate(zip((1, *widths[:-1]), widths)))

    @property
    def deep_supervision_scales(self) -> list[list[float]]:
        """Scale of each prediction relative to the input, highest resolution first, as nnU-Net's
        trainer._get_deep_supervision_scales returns them."""
        return [[0.5**k] * 3 for k in range(self.levels)]

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        """x: (B, 2, D, H, W), channel 0 CT, channel 1 PET (a missing modality is a zero channel), any size ->
        logits [P_1, ..., P_L] with P_k (B, out_channels, *ceil(size / 2**(k-1))) under deep supervision, else P_1."""
        if x.ndim != 5 or x.shape[1] != 2:
            raise ValueError(f"H2ASeg expects (B, 2, D, H, W) with channels (CT, PET), got {tuple(x.shape)}")
        ct, pet = x[:, :1], x[:, 1:]
        skips = []
        for ct_block, pet_block, mcsa in zip(self.ct_encoder, self.pet_encoder, self.mcsa):
            ct, pet = mcsa(ct_block(ct), pet_block(pet))
            skips.append(torch.cat((ct, pet), dim=1))
        decoded = self.decoder[-1](skips[-1])
        logits = [self.heads[-1](decoded)]
        for k in reversed(range(self.levels - 1)):
            size = skips[k].shape[2:]
            foreground = 1 - torch.softmax(logits[-1], dim=1)[:, :1]
            features = torch.cat((skips[k], _resize(decoded, size)), dim=1)
            decoded = self.decoder[k](self.tamw[k](features, _resize(foreground, size)))
            logits.append(self.heads[k](decoded))
        logits.reverse()
        return logits if self.deep_supervision else logits[0]
