"""LoRA (PEMMA, eq. 2) and its DoRA variant on the query and value projections of a fused ``qkv`` attention layer.

One layer computes what peft's ``lora.Linear`` computes on separate Q and V projections, with ``use_dora`` as in
peft; ``tests/test_lora_vs_peft.py`` checks outputs and gradients against peft.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LoRAQKVLinear", "set_adapters_enabled"]


class LoRAQKVLinear(nn.Linear):
    """Drop-in replacement for a fused ``qkv`` layer (``nn.Linear(d_in, 3 * d)``) with low-rank updates on Q and V.

    ``weight`` (3d x d_in) and ``bias`` are the base layer's own parameters, so base state dicts load unchanged.
    The added parameters are ``lora_A_q``/``lora_A_v`` (r x d_in) and ``lora_B_q``/``lora_B_v`` (d x r); as in
    peft, A is kaiming-uniform, B is zero and the update is scaled by ``alpha / r``, so a fresh layer computes
    exactly what the base layer did. K is left untouched, as in the paper.

    With ``use_dora`` (DoRA, Liu et al. 2024) each row is split into magnitude and direction,
    ``W' = m * (W + s B A) / ||W + s B A||``, so an update can change a row's scale and orientation separately,
    which LoRA couples. It adds ``lora_magnitude_q``/``lora_magnitude_v`` (d,), named ``lora_*`` so that they train
    wherever the factors do. As in peft's ``DoraLinearLayer`` the norm is per output row and detached (DoRA, sec.
    4.3), and the magnitudes start at the row norms of ``W + s B A``, so a fresh layer is still the base layer.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, use_dora: bool = False) -> None:
        """
        Args:
            base: the fused qkv layer to wrap; its parameters are shared, not copied.
            rank: rank r of the update matrices.
            alpha: LoRA alpha; the update is scaled by ``alpha / rank``.
            use_dora: DoRA instead of LoRA.
        """
        if type(base) is not nn.Linear:  # noqa: E721 - a subclass is an adapter already; wrapping it would drop it
            raise ValueError(f"expected a plain fused qkv nn.Linear, got {type(base).__name__}")
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
        self.use_dora = use_dora
        self.enabled = True
        d = base.out_features // 3
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A_q = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B_q = nn.Parameter(torch.empty(d, rank, **factory))
        self.lora_A_v = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B_v = nn.Parameter(torch.empty(d, rank, **factory))
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A like ``nn.Linear``'s default (kaiming uniform, a=sqrt(5)), B zero: the update starts at zero. DoRA's
        magnitudes are (re-)created, as by peft's ``update_layer``, at the current rows' norms: call this again
        after loading a new base."""
        for a, b in ((self.lora_A_q, self.lora_B_q), (self.lora_A_v, self.lora_B_v)):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)
        if self.use_dora:
            w_q, _, w_v = self.weight.chunk(3)
            self.lora_magnitude_q = nn.Parameter(self._weight_norm(w_q, self.lora_A_q, self.lora_B_q))
            self.lora_magnitude_v = nn.Parameter(self._weight_norm(w_v, self.lora_A_v, self.lora_B_v))

    def _low_rank(self) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], ...]:
        """(A, B, magnitude or None) for Q and for V."""
        mags = (self.lora_magnitude_q, self.lora_magnitude_v) if self.use_dora else (None, None)
        return (self.lora_A_q, self.lora_B_q, mags[0]), (self.lora_A_v, self.lora_B_v, mags[1])

    def _weight_norm(self, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
        """Row norms of ``W + s B A`` for W (d x d_in), (d,); detached: DoRA treats them as constants."""
        weight = weight + self.scaling * (lora_B @ lora_A).detach()
        return torch.linalg.norm(weight, dim=1).detach()

    def _update(self, x: torch.Tensor, base_out: torch.Tensor, rows: slice, lora_A: torch.Tensor,
                lora_B: torch.Tensor, magnitude: torch.Tensor | None) -> torch.Tensor:
        """What the adapter adds to the base output ``base_out`` (B, N, d) of ``rows`` (peft's LoRA / DoRA)."""
        lora_out = F.linear(F.linear(x, lora_A), lora_B) * self.scaling
        if magnitude is None:
            return lora_out
        mag_norm_scale = magnitude / self._weight_norm(self.weight[rows], lora_A, lora_B)
        if self.bias is not None:
            base_out = base_out - self.bias[rows]
        return (mag_norm_scale - 1) * base_out + mag_norm_scale * lora_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: tokens, (B, N, d_in).

        Returns:
            (B, N, 3d): ``[q | k | v]`` of the base layer plus the updates of Q and V (K untouched).
        """
        out = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return out
        d = self.out_features // 3
        (a_q, b_q, m_q), (a_v, b_v, m_v) = self._low_rank()
        q = self._update(x, out[..., :d], slice(0, d), a_q, b_q, m_q)
        v = self._update(x, out[..., 2 * d:], slice(2 * d, 3 * d), a_v, b_v, m_v)
        return out + torch.cat((q, torch.zeros_like(q), v), dim=-1)

    def merged_weight(self) -> torch.Tensor:
        """Effective (3d x d_in) weight of ``forward``, to fold the adapter into a plain ``nn.Linear``."""
        if not self.enabled:
            return self.weight
        w_q, w_k, w_v = self.weight.chunk(3)
        rows = []
        for w, (lora_A, lora_B, magnitude) in zip((w_q, w_v), self._low_rank()):
            merged = w + self.scaling * (lora_B @ lora_A)
            if magnitude is not None:
                merged = (magnitude / self._weight_norm(w, lora_A, lora_B)).view(-1, 1) * merged
            rows.append(merged)
        return torch.cat((rows[0], w_k, rows[1]))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, use_dora={self.use_dora}, "
                f"enabled={self.enabled}")


def set_adapters_enabled(module: nn.Module, enabled: bool) -> None:
    """Switch every LoRA / DoRA qkv layer and conv LoRA layer in ``module`` on or off (off: exactly the base)."""
    from nnunetv2_pemma.adaptation.conv_layers import LoRAConv2d, LoRAConv3d

    for m in module.modules():
        if isinstance(m, (LoRAQKVLinear, LoRAConv2d, LoRAConv3d)):
            m.enabled = enabled
