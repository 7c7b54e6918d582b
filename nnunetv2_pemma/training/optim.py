"""Optimiser and learning-rate schedule from a preset's "schedule" block."""

from __future__ import annotations

from typing import Any

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

# nnU-Net's poly schedule with exponent 0 is a constant learning rate (the PEMMA paper's setting).
_EXPONENTS = {"constant": 0.0, "poly": 0.9}


def build_optimizer(network: torch.nn.Module, schedule: dict[str, Any], num_epochs: int
                    ) -> tuple[torch.optim.Optimizer, PolyLRScheduler]:
    """AdamW over the parameters that require gradients only (frozen ones get no optimiser state)."""
    if schedule["optimizer"] != "AdamW":
        raise ValueError(f"unsupported optimizer {schedule['optimizer']!r} (AdamW only)")
    if schedule["lr_schedule"] not in _EXPONENTS:
        raise ValueError(f"lr_schedule {schedule['lr_schedule']!r} not in {sorted(_EXPONENTS)}")
    params = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=schedule["initial_lr"], weight_decay=schedule["weight_decay"])
    return optimizer, PolyLRScheduler(optimizer, schedule["initial_lr"], num_epochs,
                                      exponent=_EXPONENTS[schedule["lr_schedule"]])
