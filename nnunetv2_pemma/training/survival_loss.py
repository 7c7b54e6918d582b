"""The prognosis trainers' loss: nnU-Net's segmentation loss plus a weighted Cox loss from torchsurv."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torchsurv.loss.cox import neg_partial_log_likelihood

if TYPE_CHECKING:
    from nnunetv2_pemma.data.outcomes import Outcomes


@dataclass(frozen=True)
class SurvivalTargets:
    """A batch's endpoints: relapse (B,) bool, relapse-free survival in days (B,), and whether the case has an
    endpoint at all (B,) bool (cases outside HECKTOR's Task 2 train segmentation only)."""

    event: torch.Tensor
    time: torch.Tensor
    known: torch.Tensor

    def to(self, device: torch.device) -> "SurvivalTargets":
        return SurvivalTargets(self.event.to(device), self.time.to(device), self.known.to(device))


def cox_loss(log_hazard: torch.Tensor, targets: SurvivalTargets, ties: str = "efron") -> torch.Tensor:
    """torchsurv's negative Cox partial log-likelihood over the cases with an endpoint.

    A batch with fewer than two such cases, or without a relapse among them, has no risk set to rank: its loss is
    zero (kept in the graph, so every batch back-propagates the same way).
    """
    known = targets.known
    if int(known.sum()) < 2 or not bool(targets.event[known].any()):
        return log_hazard.sum() * 0.0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Ties in `time` detected")
        return neg_partial_log_likelihood(log_hazard[known].float(), targets.event[known],
                                          targets.time[known].float(), ties_method=ties)


class SegmentationAndSurvivalLoss(nn.Module):
    """Segmentation loss + ``weight`` * Cox loss for a network's training output ``(logits, log_hazard)``; the
    segmentation loss alone for plain logits (nnU-Net's validation runs the network in eval mode).

    nnU-Net's train_step calls ``loss(network(data), target)`` and knows nothing of endpoints: the trainer sets
    ``targets`` for each batch before it (from the case keys nnU-Net's data loader yields).
    """

    def __init__(self, segmentation: nn.Module, weight: float, ties: str = "efron") -> None:
        super().__init__()
        self.segmentation = segmentation
        self.weight = weight
        self.ties = ties
        self.targets: SurvivalTargets | None = None

    def forward(self, output: torch.Tensor | tuple[torch.Tensor, torch.Tensor], target: torch.Tensor
                ) -> torch.Tensor:
        if not isinstance(output, tuple):
            return self.segmentation(output, target)
        logits, log_hazard = output
        if self.targets is None:
            raise RuntimeError("SegmentationAndSurvivalLoss: no survival targets were set for this batch")
        return self.segmentation(logits, target) + self.weight * cox_loss(log_hazard, self.targets, self.ties)


def batch_outcomes(outcomes: "Outcomes", keys: Sequence[str]) -> tuple[torch.Tensor, SurvivalTargets]:
    """The encoded clinical vectors (B, F) and the endpoints of the cases `keys` (nnU-Net's data loader's
    ``batch["keys"]``); a case without a clinical row gets the missing-row encoding, one without an endpoint
    ``known=False``."""
    clinical = torch.from_numpy(np.stack([outcomes.clinical_vector(k) for k in keys]))
    endpoints = [outcomes.endpoint(k) for k in keys]
    known = torch.tensor([e is not None for e in endpoints])
    event = torch.tensor([bool(e[0]) if e else False for e in endpoints])
    time = torch.tensor([float(e[1]) if e else 0.0 for e in endpoints])
    return clinical, SurvivalTargets(event, time, known)
