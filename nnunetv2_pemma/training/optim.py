"""Optimiser and learning-rate schedule from a preset's "schedule" section."""

from __future__ import annotations

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from nnunetv2_pemma.config import Schedule

# nnU-Net's poly schedule with exponent 0 is a constant learning rate (the PEMMA paper's setting).
_EXPONENTS = {"constant": 0.0, "poly": 0.9}


def build_optimizer(network: torch.nn.Module, schedule: Schedule, num_epochs: int
                    ) -> tuple[torch.optim.Optimizer, PolyLRScheduler]:
    """AdamW (the PEMMA paper) or Adam (H2ASeg's paper) over the parameters that require gradients only (frozen
    ones get no optimiser state). "SGD" is nnU-Net's own optimiser, which its trainer builds."""
    params = [p for p in network.parameters() if p.requires_grad]
    optimizers = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam}
    if schedule.optimizer not in optimizers:
        raise ValueError(f"optimizer {schedule.optimizer!r} is built by nnU-Net's trainer, not here")
    optimizer = optimizers[schedule.optimizer](params, lr=schedule.initial_lr, weight_decay=schedule.weight_decay)
    return optimizer, PolyLRScheduler(optimizer, schedule.initial_lr, num_epochs,
                                      exponent=_EXPONENTS[schedule.lr_schedule])
