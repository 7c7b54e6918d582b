"""LoRA on the query and value projections of MONAI's fused ``qkv`` attention layer (PEMMA, eq. 2)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets.vit import ViT

__all__ = ["LoRAQKVLinear", "add_lora_to_vit", "set_lora_enabled"]


class LoRAQKVLinear(nn.Linear):
    """Drop-in replacement for ``SABlock.qkv`` (``nn.Linear(d_in, 3 * d)``) with low-rank updates on Q and V.

    ``weight`` (3d x d_in) and ``bias`` are the base layer's own parameters, so base state dicts load unchanged.
    The added parameters are ``lora_A_q``/``lora_A_v`` (r x d_in) and ``lora_B_q``/``lora_B_v`` (d x r);
    as in peft, A is kaiming-uniform, B is zero and the update is scaled by ``alpha / r``, so a fresh layer
    computes exactly what the base layer did. K is left untouched, as in the paper.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        """
        Args:
            base: the fused qkv layer to wrap; its parameters are shared, not copied.
            rank: rank r of the update matrices.
            alpha: LoRA alpha; the update is scaled by ``alpha / rank``.
        """
        if base.out_features % 3:
            raise ValueError(f"a fused qkv layer has 3 * d outputs, got {base.out_features}")
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        # meta device: skip allocating and initialising weights that are replaced by the base's right away
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.enabled = True
        d = base.out_features // 3
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A_q = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B_q = nn.Parameter(torch.empty(d, rank, **factory))
        self.lora_A_v = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B_v = nn.Parameter(torch.empty(d, rank, **factory))
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A like ``nn.Linear``'s default (kaiming uniform, a=sqrt(5)), B zero: the update starts at zero."""
        for a, b in ((self.lora_A_q, self.lora_B_q), (self.lora_A_v, self.lora_B_v)):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)

    def _delta(self, q: torch.Tensor, v: torch.Tensor, dim: int) -> torch.Tensor:
        """Scaled update ``[q | 0 | v]`` concatenated along ``dim``: K gets no update."""
        return self.scaling * torch.cat((q, torch.zeros_like(q), v), dim=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: tokens, (B, N, d_in).

        Returns:
            (B, N, 3d): ``[q | k | v]`` of the base layer plus ``alpha / r * [B_q A_q x | 0 | B_v A_v x]``.
        """
        out = super().forward(x)
        if not self.enabled:
            return out
        q = F.linear(F.linear(x, self.lora_A_q), self.lora_B_q)
        v = F.linear(F.linear(x, self.lora_A_v), self.lora_B_v)
        return out + self._delta(q, v, dim=-1)

    def merged_weight(self) -> torch.Tensor:
        """Effective (3d x d_in) weight of ``forward``, to fold LoRA into a plain ``nn.Linear`` for inference."""
        if not self.enabled:
            return self.weight
        return self.weight + self._delta(self.lora_B_q @ self.lora_A_q, self.lora_B_v @ self.lora_A_v, dim=0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, enabled={self.enabled}"


def add_lora_to_vit(vit: ViT, rank: int, alpha: float) -> list[LoRAQKVLinear]:
    """Replace ``blocks[i].attn.qkv`` of every transformer block by a :class:`LoRAQKVLinear`; return the new layers."""
    layers = []
    for i, blk in enumerate(vit.blocks):
        qkv = blk.attn.qkv
        if isinstance(qkv, LoRAQKVLinear) or not isinstance(qkv, nn.Linear):
            raise ValueError(f"block {i}: expected a plain fused qkv nn.Linear, got {type(qkv).__name__}")
        blk.attn.qkv = LoRAQKVLinear(qkv, rank, alpha)
        layers.append(blk.attn.qkv)
    return layers


def set_lora_enabled(module: nn.Module, enabled: bool) -> None:
    """Switch every :class:`LoRAQKVLinear` in ``module`` on or off (off: exactly the base network)."""
    for m in module.modules():
        if isinstance(m, LoRAQKVLinear):
            m.enabled = enabled
