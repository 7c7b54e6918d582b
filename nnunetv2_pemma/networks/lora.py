"""LoRA (PEMMA, eq. 2) or DoRA on the query and value projections of a fused ``qkv`` attention layer.

Both layers compute exactly what peft's ``lora.Linear`` (``use_dora=False`` / ``True``) computes on separate Q and V
projections; ``tests/test_lora_vs_peft.py`` checks outputs and gradients against peft.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets.vit import ViT

__all__ = [
    "ADAPTATION_METHODS",
    "DoRAQKVLinear",
    "LoRAQKVLinear",
    "add_lora_to_vit",
    "set_lora_enabled",
    "wrap_qkv",
]


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


class DoRAQKVLinear(LoRAQKVLinear):
    """DoRA (Liu et al. 2024) on Q and V of a fused qkv layer: ``W' = m * (W + s B A) / ||W + s B A||``.

    Decomposing each row into magnitude and direction lets the update change a row's scale and orientation
    separately, which LoRA couples. Adds ``lora_magnitude_q``/``lora_magnitude_v`` (d,) to the LoRA factors, named
    ``lora_*`` so that they train wherever the factors do. As in peft's ``DoraLinearLayer``: the norm is taken per
    output feature (row) and detached from the graph (DoRA, sec. 4.3), and the magnitudes start at the row norms
    of ``W + s B A`` (B = 0: of the base rows), so a fresh layer computes exactly what the base layer did.
    """

    lora_magnitude_q: nn.Parameter
    lora_magnitude_v: nn.Parameter

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """LoRA's init, then the magnitudes (re-created, as by peft's ``update_layer``) at the current row norms."""
        super().reset_lora_parameters()
        w_q, _, w_v = self.weight.chunk(3)
        self.lora_magnitude_q = nn.Parameter(self._weight_norm(w_q, self.lora_A_q, self.lora_B_q))
        self.lora_magnitude_v = nn.Parameter(self._weight_norm(w_v, self.lora_A_v, self.lora_B_v))

    def _weight_norm(self, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
        """Row norms of ``W + s B A`` for W (d x d_in), (d,); detached: DoRA treats them as constants."""
        weight = weight + self.scaling * (lora_B @ lora_A).detach()
        return torch.linalg.norm(weight, dim=1).detach()

    def _dora_delta(
        self,
        x: torch.Tensor,
        base_out: torch.Tensor,
        rows: slice,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        magnitude: torch.Tensor,
    ) -> torch.Tensor:
        """What DoRA adds to the base output ``base_out`` (B, N, d) of ``rows``, as peft's ``DoraLinearLayer``."""
        mag_norm_scale = magnitude / self._weight_norm(self.weight[rows], lora_A, lora_B)
        if self.bias is not None:
            base_out = base_out - self.bias[rows]
        lora_out = F.linear(F.linear(x, lora_A), lora_B)
        return (mag_norm_scale - 1) * base_out + mag_norm_scale * lora_out * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: tokens, (B, N, d_in).

        Returns:
            (B, N, 3d): ``[q | k | v]`` with ``q = m_q / ||W_q + s B_q A_q|| * (W_q + s B_q A_q) x + b_q``, likewise
            v; k of the base layer.
        """
        out = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return out
        d = self.out_features // 3
        base_q, _, base_v = out.split(d, dim=-1)
        q = self._dora_delta(x, base_q, slice(0, d), self.lora_A_q, self.lora_B_q, self.lora_magnitude_q)
        v = self._dora_delta(x, base_v, slice(2 * d, 3 * d), self.lora_A_v, self.lora_B_v, self.lora_magnitude_v)
        return out + torch.cat((q, torch.zeros_like(q), v), dim=-1)

    def merged_weight(self) -> torch.Tensor:
        """Effective (3d x d_in) weight of ``forward``, to fold DoRA into a plain ``nn.Linear`` for inference."""
        if not self.enabled:
            return self.weight
        w_q, w_k, w_v = self.weight.chunk(3)
        rows = []
        for w, lora_A, lora_B, magnitude in (
            (w_q, self.lora_A_q, self.lora_B_q, self.lora_magnitude_q),
            (w_v, self.lora_A_v, self.lora_B_v, self.lora_magnitude_v),
        ):
            dora_factor = (magnitude / self._weight_norm(w, lora_A, lora_B)).view(-1, 1)
            rows.append(dora_factor * (w + self.scaling * (lora_B @ lora_A)))
        return torch.cat((rows[0], w_k, rows[1]))


_QKV_ADAPTERS: dict[str, type[LoRAQKVLinear]] = {"lora": LoRAQKVLinear, "dora": DoRAQKVLinear}
ADAPTATION_METHODS = tuple(_QKV_ADAPTERS)


def wrap_qkv(linear: nn.Linear, rank: int, alpha: float, method: str = "lora") -> LoRAQKVLinear:
    """Wrap a fused qkv ``nn.Linear(d_in, 3d)`` (ViT or Swin attention) with LoRA or DoRA on Q and V.

    The returned layer shares ``linear``'s parameters, so base state dicts load unchanged.
    """
    if method not in _QKV_ADAPTERS:
        raise ValueError(f"adaptation method must be one of {ADAPTATION_METHODS}, got {method!r}")
    if isinstance(linear, LoRAQKVLinear) or not isinstance(linear, nn.Linear):
        raise ValueError(f"expected a plain fused qkv nn.Linear, got {type(linear).__name__}")
    return _QKV_ADAPTERS[method](linear, rank, alpha)


def add_lora_to_vit(vit: ViT, rank: int, alpha: float, method: str = "lora") -> list[LoRAQKVLinear]:
    """Replace ``blocks[i].attn.qkv`` of every transformer block by a LoRA or DoRA layer; return the new layers."""
    layers = []
    for i, blk in enumerate(vit.blocks):
        try:
            blk.attn.qkv = wrap_qkv(blk.attn.qkv, rank, alpha, method)
        except ValueError as e:
            raise ValueError(f"block {i}: {e}") from None
        layers.append(blk.attn.qkv)
    return layers


def set_lora_enabled(module: nn.Module, enabled: bool) -> None:
    """Switch every LoRA or DoRA qkv layer in ``module`` on or off (off: exactly the base network)."""
    for m in module.modules():
        if isinstance(m, LoRAQKVLinear):
            m.enabled = enabled
