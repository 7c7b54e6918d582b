"""Prognosis networks: a Cox survival head on the encoder's final CT tokens and on the lesion volumes the network
segments, trained jointly with segmentation.

The head reads the mean of the final CT tokens and, per lesion class, log(1 + the expected number of voxels of
that class in the patch) from the network's own softmax, detached (the survival loss does not bend the
segmentation). Relapse risk in head-and-neck cancer follows tumour burden, which the segmentation measures
directly; on the phantom the tokens alone did not learn it in a CPU budget (README, "Prognosis").

Three forms, one per way of adding modalities (extended PEMMA paper; TMSS for the clinical token):

- :class:`SurvivalUNETR`, the CT base: MONAI's UNETR plus ``prognosis``, the head (the tokens are read from MONAI's
  ``ViT`` module, whose output UNETR's own forward computes).
- :class:`SurvivalPEMMAUNETR`: PEMMA's UNETR (PET tokens, PET skip, LoRA/DoRA) with the same head on the CT tokens
  that ``encode`` returns; with ``clinical=True`` it adds one clinical token (``ehr_*``), built from the encoded
  clinical vector by a linear layer, which attends with the image tokens and is dropped before the decoder.
- :class:`SurvivalEarlyFusionUNETR`: the early-fusion UNETR with the head; with ``clinical=True`` the clinical vector
  is concatenated to the pooled tokens before the head.

In training mode ``forward`` returns ``(logits, log_hazard)`` (what the prognosis trainers' loss takes); in eval mode
it returns the logits alone, so nnU-Net's validation and ``nnUNetv2_predict`` segment as with any model. The
clinical vectors of a batch are set with :meth:`PrognosisNetwork.set_clinical`; when none is set, every case counts
as having no clinical row (the "missing modality" of the clinical data).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import UNETR
from torch import nn

from nnunetv2_pemma.adaptation.methods import CLINICAL_SLOT
from nnunetv2_pemma.config import MODALITIES, Adaptation
from nnunetv2_pemma.data.outcomes import CLINICAL_FEATURES, MISSING_SUFFIX
from nnunetv2_pemma.networks.backbones.unetr import UNETRSpec, enable_sdpa, freeze_unused_norms
from nnunetv2_pemma.networks.early_fusion import EarlyFusionUNETR
from nnunetv2_pemma.networks.pemma_unetr import PEMMAUNETR


def missing_clinical_vector() -> torch.Tensor:
    """The encoding of a case without a clinical row: every value 0, every missing indicator 1. (len(features),)"""
    return torch.tensor([1.0 if name.endswith(MISSING_SUFFIX) else 0.0 for name in CLINICAL_FEATURES])


def lesion_volumes(logits: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) logits -> (B, C - 1): log(1 + expected voxels of each foreground class), detached."""
    probabilities = torch.softmax(logits.detach().float(), dim=1)[:, 1:]
    return torch.log1p(probabilities.flatten(2).sum(2))


class SurvivalHead(nn.Module):
    """Mean of the final CT tokens (B, N, hidden), the lesion volumes (B, K) and optionally the clinical vector
    (B, F) -> (B,) log relative hazard (Cox: higher means earlier relapse)."""

    def __init__(self, hidden_size: int, lesion_classes: int, clinical_features: int = 0) -> None:
        super().__init__()
        self.clinical_features = clinical_features
        self.linear = nn.Linear(hidden_size + lesion_classes + clinical_features, 1)

    @staticmethod
    @torch.no_grad()
    def widened(head: "SurvivalHead", clinical_features: int) -> "SurvivalHead":
        """A head that also reads `clinical_features` clinical values, whose weights start at zero: at first it
        gives exactly `head`'s risks."""
        image_features = head.linear.in_features - head.clinical_features
        wide = SurvivalHead(image_features, 0, head.clinical_features + clinical_features)
        wide.linear.weight.zero_()
        wide.linear.weight[:, : head.linear.in_features] = head.linear.weight
        wide.linear.bias.copy_(head.linear.bias)
        return wide

    def forward(self, tokens: torch.Tensor, volumes: torch.Tensor, clinical: torch.Tensor | None = None
                ) -> torch.Tensor:
        features = [tokens.mean(dim=1), volumes.to(tokens)]
        if self.clinical_features:
            features.append(clinical.to(tokens))
        return self.linear(torch.cat(features, dim=1)).squeeze(1)


class ClinicalToken(nn.Module):
    """Encoded clinical vector (B, F) -> one token (B, 1, hidden): a linear embedding plus a learned position."""

    def __init__(self, clinical_features: int, hidden_size: int) -> None:
        super().__init__()
        self.embedding = nn.Linear(clinical_features, hidden_size)
        self.position = nn.Parameter(torch.zeros(1, 1, hidden_size))

    def forward(self, clinical: torch.Tensor) -> torch.Tensor:
        return self.embedding(clinical).unsqueeze(1) + self.position


class PrognosisNetwork(nn.Module):
    """Mixin (before the MONAI network in the bases): joint segmentation and risk, and the batch's clinical data.

    A subclass implements :meth:`segment_and_encode` (logits and the final CT tokens from one pass).
    """

    prognosis: SurvivalHead
    uses_clinical: bool

    def _add_prognosis(self, hidden_size: int, out_channels: int, head_clinical_features: int) -> None:
        self.prognosis = SurvivalHead(hidden_size, out_channels - 1, head_clinical_features)
        self.register_buffer("missing_clinical", missing_clinical_vector(), persistent=False)
        self._clinical: torch.Tensor | None = None

    def set_clinical(self, clinical: torch.Tensor | None) -> None:
        """The encoded clinical vectors (B, F) of the next forward's cases, or None (no clinical row for any)."""
        self._clinical = clinical

    def clinical_for(self, x_in: torch.Tensor) -> torch.Tensor:
        """(B, F) clinical vectors for the batch ``x_in``: those set, else the missing-row encoding."""
        if self._clinical is None:
            return self.missing_clinical.to(x_in).expand(x_in.shape[0], -1)
        if self._clinical.shape[0] != x_in.shape[0]:
            raise ValueError(f"clinical vectors for {self._clinical.shape[0]} cases, batch of {x_in.shape[0]}")
        return self._clinical.to(x_in)

    def segment_and_encode(self, x_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, out, D, H, W), final CT tokens (B, N, hidden)) for the input (B, C, D, H, W)."""
        raise NotImplementedError

    def segment_and_risk(self, x_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, out, D, H, W), log relative hazard (B,)) of the input patches."""
        logits, tokens = self.segment_and_encode(x_in)
        return logits, self.prognosis(tokens, lesion_volumes(logits), self.clinical_for(x_in))

    def forward(self, x_in: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Training: (logits, log hazard (B,)); eval: logits, as nnU-Net's validation and predictor expect."""
        if not self.training:
            return self.segment_and_encode(x_in)[0]
        return self.segment_and_risk(x_in)


def _vit_output_and_logits(net: UNETR, forward, x_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the UNETR's own forward, keeping the output tokens of its ``vit`` (what it hands the decoder)."""
    seen: list[torch.Tensor] = []
    handle = net.vit.register_forward_hook(lambda module, args, output: seen.append(output[0]))
    try:
        logits = forward(x_in)
    finally:
        handle.remove()
    return logits, seen[0]


class SurvivalUNETR(PrognosisNetwork, UNETR):
    """The CT base for prognosis: MONAI's UNETR (its parameter names) plus the survival head ``prognosis.*``."""

    uses_clinical = False

    def __init__(self, spec: UNETRSpec, in_channels: int, out_channels: int, img_size: Sequence[int]) -> None:
        """
        Args:
            spec: the preset's model section.
            in_channels: input channels (1 for the CT base).
            out_channels: segmentation classes including background.
            img_size: training patch size (D, H, W), each a multiple of 16.
        """
        super().__init__(in_channels=in_channels, out_channels=out_channels,
                         img_size=spec.check_patch_size(img_size), **spec.kwargs())
        enable_sdpa(self.vit)
        freeze_unused_norms(self.vit)
        self._add_prognosis(spec.hidden_size, out_channels, 0)

    def segment_and_encode(self, x_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _vit_output_and_logits(self, super(PrognosisNetwork, self).forward, x_in)


class SurvivalEarlyFusionUNETR(PrognosisNetwork, EarlyFusionUNETR):
    """Early fusion with the survival head; ``clinical=True`` concatenates the clinical vector before the head."""

    def __init__(self, spec: UNETRSpec, out_channels: int, img_size: Sequence[int],
                 input_modalities: Sequence[str] = MODALITIES, clinical: bool = False) -> None:
        super().__init__(spec, out_channels, img_size, input_modalities)
        self.uses_clinical = clinical
        self._add_prognosis(spec.hidden_size, out_channels, len(CLINICAL_FEATURES) if clinical else 0)

    def segment_and_encode(self, x_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _vit_output_and_logits(self, super(PrognosisNetwork, self).forward, x_in)


class SurvivalPEMMAUNETR(PrognosisNetwork, PEMMAUNETR):
    """PEMMA's UNETR with the survival head on the CT tokens; ``clinical=True`` adds the clinical token ``ehr_*``
    (a method of its own, trained in the "clinical" stage with the qkv adapters)."""

    def __init__(self, spec: UNETRSpec, adaptation: Adaptation, out_channels: int, img_size: Sequence[int],
                 input_modalities: Sequence[str] = MODALITIES, clinical: bool = False) -> None:
        super().__init__(spec, adaptation, out_channels, img_size, input_modalities)
        self.uses_clinical = clinical
        self._add_prognosis(spec.hidden_size, out_channels, 0)
        if clinical:
            self.ehr_token = ClinicalToken(len(CLINICAL_FEATURES), spec.hidden_size)
            self.adapter_methods = self.adapter_methods + (CLINICAL_SLOT,)

    def segment_and_encode(self, x_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ct, pet = self.split_modalities(x_in)
        extra = [self.ehr_token(self.clinical_for(x_in))] if self.uses_clinical else []
        encoded = self.encode(ct, pet, extra)
        return self.decode(encoded, self.input_skip(ct, pet)), encoded.tokens
