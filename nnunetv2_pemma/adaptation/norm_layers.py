"""Trainable shifts of a frozen instance norm's affine parameters (``adaptation.train_norms`` of a CNN preset).

Training a CNN's normalisation layers is the cheapest way to adapt it to another scanner (AdaBN and its trained
variants), but they are base parameters: trained in place, the base would no longer be the base other adapters
and the CT path rely on. So the shift is what trains: ``weight + norm_shift_weight`` and ``bias +
norm_shift_bias``, both shifts zero at the start, the base's own tensors shared and frozen. :func:`fold_adapters`
adds them into a plain norm.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ShiftedInstanceNorm2d", "ShiftedInstanceNorm3d", "wrap_norm"]


class _ShiftedInstanceNorm:
    """Mixin over ``nn.InstanceNorm2d`` / ``nn.InstanceNorm3d`` with affine parameters: the base's ``weight`` and
    ``bias`` (C,) are shared; added are ``norm_shift_weight`` and ``norm_shift_bias`` (C,), zero at the start."""

    weight: nn.Parameter
    bias: nn.Parameter
    num_features: int
    eps: float

    def __init__(self, base: nn.Module) -> None:
        if not base.affine or base.track_running_stats:
            raise ValueError("norm shifts wrap instance norms with affine parameters and no running statistics")
        super().__init__(base.num_features, base.eps, base.momentum, affine=True, device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.norm_shift_weight = nn.Parameter(torch.zeros_like(base.weight))
        self.norm_shift_bias = nn.Parameter(torch.zeros_like(base.bias))

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """Both shifts back to zero (the name every adapter's reset has)."""
        self.norm_shift_weight.zero_()
        self.norm_shift_bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, *spatial) -> same shape, normalised per sample and channel, scaled and shifted."""
        return F.instance_norm(x, None, None, self.weight + self.norm_shift_weight, self.bias + self.norm_shift_bias,
                               True, self.momentum or 0.0, self.eps)

    def plain(self) -> nn.Module:
        """A plain instance norm of the base's class with the shifts added into its weight and bias."""
        base_class = next(c for c in type(self).__mro__ if c.__module__.startswith("torch.nn"))
        merged = base_class(self.num_features, self.eps, self.momentum, affine=True, device="meta")
        for name in ("weight", "bias"):
            value = (getattr(self, name) + getattr(self, f"norm_shift_{name}")).detach().clone()
            setattr(merged, name, nn.Parameter(value, requires_grad=getattr(self, name).requires_grad))
        return merged.train(self.training)


class ShiftedInstanceNorm2d(_ShiftedInstanceNorm, nn.InstanceNorm2d):
    """Shifts around an ``nn.InstanceNorm2d``."""


class ShiftedInstanceNorm3d(_ShiftedInstanceNorm, nn.InstanceNorm3d):
    """Shifts around an ``nn.InstanceNorm3d``."""


def wrap_norm(base: nn.Module) -> nn.Module:
    """The shifted form of a plain affine ``nn.InstanceNorm2d`` / ``nn.InstanceNorm3d``."""
    for plain, wrapped in ((nn.InstanceNorm3d, ShiftedInstanceNorm3d), (nn.InstanceNorm2d, ShiftedInstanceNorm2d)):
        if type(base) is plain:  # noqa: E721 - a subclass is shifted already
            return wrapped(base)
    raise ValueError(f"expected a plain nn.InstanceNorm2d or nn.InstanceNorm3d, got {type(base).__name__}")
