"""Mixture of LoRA adapters (``moa``): several LoRA experts on Q and V of every attention layer, one per routing key.

Routing (the preset's ``moa_routing``):

- ``"center"``: one expert per centre, chosen by the case id's centre (``data.centers.center_of``). A continual update
  on a new centre adds that centre's expert and trains only it, so earlier centres' experts and the base are not
  touched: forgetting of earlier centres is impossible by construction.
- ``"modality"``: one expert per input pattern (CP, C, P), chosen by which modalities the input holds.
- ``"gate"``: ``moa_gate_experts`` experts and a learned top-1 gate per layer on the mean token (Switch-style: the
  chosen expert's output is scaled by its gate probability, which is what trains the gate).

An unknown key (a centre without an expert, or none given: ``nnUNetv2_predict`` and nnU-Net's own validation do not
pass case ids to the network) uses the **average of all experts' updates** (AdaMix's inference rule).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

ROUTINGS = ("center", "modality", "gate")
PATTERNS = ("CP", "C", "P")
"""Expert keys of modality routing: both modalities, CT only, PET only."""


def check_expert_keys(keys: Sequence[str]) -> tuple[str, ...]:
    """Expert keys as module names: distinct, non-empty, no dots (ValueError naming the bad key)."""
    if isinstance(keys, str) or not isinstance(keys, Sequence):
        raise ValueError(f"moa_experts must be a list of names, got {keys!r}")
    keys = tuple(keys)
    for key in keys:
        if not isinstance(key, str) or not key or "." in key or not key.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"moa expert name {key!r} must be letters, digits, '-' or '_' (a centre such as CHUM)")
    if len(set(keys)) != len(keys):
        raise ValueError(f"moa_experts has duplicates: {list(keys)}")
    return keys


def expert_keys(routing: str, centers: Sequence[str], gate_experts: int) -> tuple[str, ...]:
    """The experts a network with this routing holds."""
    if routing == "modality":
        return PATTERNS
    if routing == "gate":
        return tuple(f"expert{i}" for i in range(gate_experts))
    return tuple(centers)


class LoRAExpert(nn.Module):
    """One expert: low-rank factors on Q and V, initialised as :class:`~.layers.LoRAQKVLinear`'s (A kaiming, B
    zero), so a new expert adds nothing until it trains."""

    def __init__(self, d_in: int, d: int, rank: int, factory: dict) -> None:
        super().__init__()
        self.A_q = nn.Parameter(torch.empty(rank, d_in, **factory))
        self.B_q = nn.Parameter(torch.zeros(d, rank, **factory))
        self.A_v = nn.Parameter(torch.empty(rank, d_in, **factory))
        self.B_v = nn.Parameter(torch.zeros(d, rank, **factory))
        for a in (self.A_q, self.A_v):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, N, d_in) -> unscaled updates of Q and V, (B, N, d) each."""
        return F.linear(F.linear(x, self.A_q), self.B_q), F.linear(F.linear(x, self.A_v), self.B_v)


class MoALoRAQKVLinear(nn.Linear):
    """A fused ``qkv`` layer (``nn.Linear(d_in, 3 d)``, its own parameters shared, not copied) plus LoRA experts.

    Added: ``moa_experts.<key>.{A_q, B_q, A_v, B_v}`` per expert and, with a gate, ``moa_gate`` (d_in -> experts).
    Per sample the update is ``sum_e w_e * (alpha / r) * B_e A_e x`` on Q and V; ``route`` holds the weights
    ``w`` (B, experts) the network sets before each forward (MONAI's attention passes the layer nothing but the
    tokens); None means an unknown key: every expert with weight 1 / experts.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, experts: Sequence[str], gate: bool = False) -> None:
        if type(base) is not nn.Linear:  # noqa: E721 - a subclass is an adapter already
            raise ValueError(f"expected a plain fused qkv nn.Linear, got {type(base).__name__}")
        if base.out_features % 3:
            raise ValueError(f"a fused qkv layer has 3 * d outputs, got {base.out_features}")
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        experts = check_expert_keys(experts)
        if not experts:
            raise ValueError("a mixture of adapters needs at least one expert")
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        d = base.out_features // 3
        self.moa_experts = nn.ModuleDict({k: LoRAExpert(base.in_features, d, rank, factory) for k in experts})
        self.moa_gate = nn.Linear(base.in_features, len(experts), **factory) if gate else None
        self.route: torch.Tensor | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.moa_experts.keys())

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample expert weights (B_x, experts) for tokens x (B_x, N, d_in). Swin's window attention sees the
        windows of each sample in a row (B_x = B * windows): a sample's weights repeat over its windows."""
        if self.moa_gate is not None:
            probs = self.moa_gate(x.mean(dim=1)).softmax(dim=-1)
            top = probs.argmax(dim=-1, keepdim=True)
            return torch.zeros_like(probs).scatter(-1, top, probs.gather(-1, top))
        if self.route is None:
            return x.new_full((x.shape[0], len(self.moa_experts)), 1.0 / len(self.moa_experts))
        route = self.route.to(x)
        if route.shape[0] != x.shape[0]:
            if x.shape[0] % route.shape[0]:
                raise ValueError(f"routing weights for {route.shape[0]} samples, tokens of {x.shape[0]}")
            route = route.repeat_interleave(x.shape[0] // route.shape[0], dim=0)
        return route

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: tokens, (B, N, d_in).

        Returns:
            (B, N, 3d): ``[q | k | v]`` of the base layer plus the routed experts' updates of Q and V.
        """
        out = F.linear(x, self.weight, self.bias)
        w = self.weights(x)
        d = self.out_features // 3
        q = v = torch.zeros_like(out[..., :d])
        for e, expert in enumerate(self.moa_experts.values()):
            if not bool(w[:, e].any()):  # an expert no sample uses costs nothing and gets no gradient
                continue
            dq, dv = expert(x)
            scale = (w[:, e] * self.scaling).view(-1, 1, 1)
            q, v = q + scale * dq, v + scale * dv
        return out + torch.cat((q, torch.zeros_like(q), v), dim=-1)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, experts={list(self.keys)}, "
                f"gate={self.moa_gate is not None}")


def routing_weights(routing: str, experts: Sequence[str], present: torch.Tensor,
                    centers: Sequence[str | None] | None) -> torch.Tensor | None:
    """Expert weights (B, experts) for routing by key; None for the gate (each layer decides) or when no sample
    has a key (every sample then averages the experts).

    Args:
        present: (B, 2) bool, whether each sample holds CT and PET (after modality dropout).
        centers: each sample's centre (modality routing ignores it); None: unknown for every sample.
    """
    if routing == "gate":
        return None
    if routing == "modality":
        keys = [PATTERNS[0] if ct and pet else PATTERNS[1] if ct else PATTERNS[2] for ct, pet in present.tolist()]
    else:
        if centers is None:
            return None
        if len(centers) != present.shape[0]:
            raise ValueError(f"{len(centers)} centres for a batch of {present.shape[0]}")
        keys = list(centers)
    index = {k: i for i, k in enumerate(experts)}
    weights = torch.zeros(len(keys), len(experts))
    for row, key in enumerate(keys):
        if key in index:
            weights[row, index[key]] = 1.0
        else:  # unknown key: the average of the experts
            weights[row] = 1.0 / len(experts)
    return weights


def moa_layers(module: nn.Module) -> list[MoALoRAQKVLinear]:
    return [m for m in module.modules() if isinstance(m, MoALoRAQKVLinear)]


def expert_parameter_key(name: str) -> str | None:
    """The expert a parameter name belongs to (``...moa_experts.<key>.A_q`` -> key), else None."""
    parts = name.split(".")
    return parts[parts.index("moa_experts") + 1] if "moa_experts" in parts[:-1] else None
