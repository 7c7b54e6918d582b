"""LoRA around a frozen convolution, as peft's ``lora.Conv2d`` / ``lora.Conv3d`` compute it.

``conv(x) + (alpha / r) * B(A(x))``: A is a convolution with the base's kernel, stride and padding from the base's
input channels into r; B is a 1x1(x1) convolution from r into the base's output channels, zero at the start, so
a fresh layer computes exactly what the base did. ``tests/test_conv_lora_vs_peft.py`` checks outputs and
gradients against peft.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LoRAConv2d", "LoRAConv3d", "RoutedLoRAConv2d", "RoutedLoRAConv3d", "wrap_conv"]


class _LoRAConv:
    """Mixin over ``nn.Conv2d`` / ``nn.Conv3d``: the base's ``weight`` and ``bias`` are shared, not copied, so base
    state dicts load unchanged; added are ``conv_lora_A`` (r, C_in, *kernel) and ``conv_lora_B`` (C_out, r, 1...)."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    _conv = staticmethod(F.conv3d)

    def __init__(self, base: nn.Module, rank: int, alpha: float) -> None:
        """
        Args:
            base: the plain convolution to wrap (of this class's convolution type); its parameters are shared.
            rank: rank r of the update.
            alpha: LoRA alpha; the update is scaled by ``alpha / rank``.
        """
        # meta device: skip allocating weights that are replaced by the base's right away
        super().__init__(base.in_channels, base.out_channels, base.kernel_size, base.stride, base.padding,
                         base.dilation, base.groups, base.bias is not None, base.padding_mode, device="meta")
        if base.groups != 1 or base.padding_mode != "zeros" or any(d != 1 for d in base.dilation):
            raise ValueError(f"LoRA wraps convolutions with groups=1, no dilation and zero padding, got "
                             f"groups={base.groups}, dilation={base.dilation}, padding_mode={base.padding_mode!r}")
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.enabled = True
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        ones = (1,) * len(base.kernel_size)
        self.conv_lora_A = nn.Parameter(torch.empty(rank, base.in_channels, *base.kernel_size, **factory))
        self.conv_lora_B = nn.Parameter(torch.empty(base.out_channels, rank, *ones, **factory))
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A as a convolution's default init (kaiming uniform, a=sqrt(5)), B zero, as peft."""
        nn.init.kaiming_uniform_(self.conv_lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.conv_lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, *spatial) -> (B, C_out, *spatial'): the base convolution plus the scaled low-rank path."""
        out = super().forward(x)
        if not self.enabled:
            return out
        low = self._conv(x, self.conv_lora_A, None, self.stride, self.padding)
        return out + self.scaling * self._conv(low, self.conv_lora_B)

    def merged_weight(self) -> torch.Tensor:
        """The effective kernel (C_out, C_in, *kernel): W + s * B A, to fold the adapter into the base conv."""
        if not self.enabled:
            return self.weight
        update = torch.einsum("or,ri...->oi...", self.conv_lora_B.flatten(1), self.conv_lora_A)
        return self.weight + self.scaling * update

    def plain(self) -> nn.Module:
        """A plain convolution of the base's class holding ``merged_weight()`` (and the base's bias)."""
        base_class = next(c for c in type(self).__mro__ if c.__module__.startswith("torch.nn"))
        merged = base_class(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                            self.dilation, bias=self.bias is not None, device="meta")
        merged.weight = nn.Parameter(self.merged_weight().detach().clone(), requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            merged.bias = self.bias
        return merged.train(self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, enabled={self.enabled}"


class LoRAConv2d(_LoRAConv, nn.Conv2d):
    """LoRA around an ``nn.Conv2d``."""

    _conv = staticmethod(F.conv2d)


class LoRAConv3d(_LoRAConv, nn.Conv3d):
    """LoRA around an ``nn.Conv3d``."""

    _conv = staticmethod(F.conv3d)


class _RoutedLoRAConv(_LoRAConv):
    """Conv LoRA with a second low-rank pair for inputs without PET (``adaptation.ct_only_adapters``).

    ``conv_lora_A/B`` act on samples whose input holds PET (CT+PET or PET alone), ``ct_lora_A`` (r, C_in,
    *kernel) and ``ct_lora_B`` (C_out, r, 1...) on CT-only samples. Both B start at zero. The network sets
    ``holds_pet`` (B,) bool before each forward (None: every sample holds PET). So what a CT-only update trains
    cannot change a CT+PET or PET output, and CT alone through a model whose CT pair is still zero is its base.
    """

    holds_pet: torch.Tensor | None

    def __init__(self, base: nn.Module, rank: int, alpha: float) -> None:
        super().__init__(base, rank, alpha)
        self.ct_lora_A = nn.Parameter(torch.empty_like(self.conv_lora_A))
        self.ct_lora_B = nn.Parameter(torch.empty_like(self.conv_lora_B))
        self.holds_pet = None
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        super().reset_lora_parameters()
        if hasattr(self, "ct_lora_A"):
            nn.init.kaiming_uniform_(self.ct_lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.ct_lora_B)

    def _update(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.scaling * self._conv(self._conv(x, a, None, self.stride, self.padding), b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, *spatial) -> (B, C_out, *spatial'): the base convolution plus, per sample, the update of
        the pair its input pattern selects (a batch of one pattern computes that pair only)."""
        out = super(_LoRAConv, self).forward(x)  # the base convolution's own forward
        if not self.enabled:
            return out
        pet = self.holds_pet
        if pet is None or bool(pet.all()):
            return out + self._update(x, self.conv_lora_A, self.conv_lora_B)
        if not bool(pet.any()):
            return out + self._update(x, self.ct_lora_A, self.ct_lora_B)
        pet = pet.view(-1, *([1] * (x.ndim - 1)))
        return out + torch.where(pet, self._update(x, self.conv_lora_A, self.conv_lora_B),
                                 self._update(x, self.ct_lora_A, self.ct_lora_B))

    def merged_weight(self, holds_pet: bool = True) -> torch.Tensor:
        """The effective kernel for inputs with PET (``holds_pet``) or CT alone."""
        if not self.enabled or holds_pet:
            return super().merged_weight()
        update = torch.einsum("or,ri...->oi...", self.ct_lora_B.flatten(1), self.ct_lora_A)
        return self.weight + self.scaling * update

    def plain(self, holds_pet: bool | None = None) -> nn.Module:
        """A plain convolution for one input pattern: with PET (``holds_pet`` True) or CT alone (False)."""
        if holds_pet is None:
            raise TypeError("a convolution with CT-only adapters folds for one input pattern: pass holds_pet "
                            "(True: CT+PET or PET input, False: CT alone)")
        merged = super().plain()
        merged.weight = nn.Parameter(self.merged_weight(holds_pet).detach().clone(),
                                     requires_grad=self.weight.requires_grad)
        return merged


class RoutedLoRAConv2d(_RoutedLoRAConv, nn.Conv2d):
    """Conv LoRA with a CT-only pair around an ``nn.Conv2d``."""

    _conv = staticmethod(F.conv2d)


class RoutedLoRAConv3d(_RoutedLoRAConv, nn.Conv3d):
    """Conv LoRA with a CT-only pair around an ``nn.Conv3d``."""

    _conv = staticmethod(F.conv3d)


def wrap_conv(base: nn.Module, rank: int, alpha: float, ct_only: bool = False) -> nn.Module:
    """The LoRA form of a plain ``nn.Conv2d`` / ``nn.Conv3d`` (with ``ct_only``, also a pair for CT-only input)."""
    pairs = ((nn.Conv3d, RoutedLoRAConv3d), (nn.Conv2d, RoutedLoRAConv2d)) if ct_only else \
        ((nn.Conv3d, LoRAConv3d), (nn.Conv2d, LoRAConv2d))
    for plain, wrapped in pairs:
        if type(base) is plain:  # noqa: E721 - a subclass is an adapter already
            return wrapped(base, rank, alpha)
    raise ValueError(f"expected a plain nn.Conv2d or nn.Conv3d, got {type(base).__name__}")
