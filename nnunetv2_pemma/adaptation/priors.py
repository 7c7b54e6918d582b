"""Context priors (``prior``): learnable prior tokens per modality, chosen by which modalities the input holds.

After Hermes ("Training like a medical resident", 2024) and missing-aware prompts (Lee et al., CVPR 2023): each
modality has ``prior_tokens`` learnable tokens for "present" and as many for "absent"; a sample gets, per modality,
the set its input calls for (2 x prior_tokens tokens in all, so a batch mixing CP, C and P inputs keeps one sequence
length without attention masks). They enter a global-attention ViT in one of two ways (``prior_entry``):

- ``"fusion"`` (Hermes; the default): one set of prior tokens meets the image tokens in a two-way attention block (priors attend
  to the features, then the features attend to the updated priors) after each block whose output the decoder
  reads; the features' update is gated by a zero-initialised scalar, so a fresh block passes the features through.
  The attention runs in a narrower space (``fusion_width``, as SAM's two-way transformer downsamples its
  cross-attention), which keeps four blocks at 0.9 M parameters for the paper's ViT-B instead of 19 M.
- ``"tokens"`` (prompt tuning, VPT-deep): new prior tokens join the image tokens at the input of every block and
  are dropped after it; ``depth`` sets of tokens, nothing else.

Measured on the phantom (demo network, one run, MDA validation cases, tumour Dice CP / C / P): fusion 0.68 / 0.59 /
0.42, tokens 0.51 / 0.59 / 0.40, LoRA alone 0.63 / 0.59 / 0.35; tokens change the base's function from the first
step, fusion starts from it. Hence fusion by default (README, "Beyond LoRA").

Trained in the adaptation stage with the PET modules and the LoRA on Q and V; in continual updates the priors and
the LoRA train. Window attention (SwinUNETR) has no global sequence to add tokens to: UNETR only.
"""

from __future__ import annotations

import torch
import torch.nn as nn

PRIOR_ENTRIES = ("tokens", "fusion")
FUSION_AFTER_BLOCKS = (3, 6, 9, 11)
"""Blocks (0-based) after which "fusion" runs: the three UNETR's decoder taps as skips and the last one."""


def fusion_width(hidden_size: int, num_heads: int) -> int:
    """Width of the fusion attention: an eighth of the ViT's, at least 8 per head (a multiple of the heads)."""
    return max(hidden_size // 8 // num_heads, 8) * num_heads


class TwoWayFusion(nn.Module):
    """Hermes-style two-way attention between prior tokens and image tokens (pre-norm, residual), in a space of
    ``width`` channels: image tokens are projected down for it and the features' update projected back up."""

    def __init__(self, hidden_size: int, num_heads: int, width: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, width)
        self.norm_priors = nn.LayerNorm(width)
        self.norm_features = nn.LayerNorm(width)
        self.priors_from_features = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.features_from_priors = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.up = nn.Linear(width, hidden_size)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, features: torch.Tensor, priors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tokens (B, N, hidden) and prior tokens (B, P, width) -> both updated, same shapes."""
        f = self.norm_features(self.down(features))
        priors = priors + self.priors_from_features(self.norm_priors(priors), f, f, need_weights=False)[0]
        p = self.norm_priors(priors)
        features = features + self.gate * self.up(self.features_from_priors(f, p, p, need_weights=False)[0])
        return features, priors


class ContextPriors(nn.Module):
    """The prior tokens of one ViT and, for "fusion", its fusion blocks.

    ``tokens``: (depth, 2 modalities, 2 states, prior_tokens, hidden) for "tokens", (2, 2, prior_tokens, width) for
    "fusion"; modality 0 is CT, 1 PET; state 0 is present, 1 absent.
    """

    def __init__(self, hidden_size: int, num_heads: int, depth: int, num_tokens: int, entry: str) -> None:
        super().__init__()
        if entry not in PRIOR_ENTRIES:
            raise ValueError(f"prior entry must be one of {PRIOR_ENTRIES}, got {entry!r}")
        if entry == "fusion" and max(FUSION_AFTER_BLOCKS) >= depth:
            raise ValueError(f"prior fusion runs after blocks {FUSION_AFTER_BLOCKS}; the ViT has {depth}")
        self.entry = entry
        width = fusion_width(hidden_size, num_heads)
        shape = (depth, 2, 2, num_tokens, hidden_size) if entry == "tokens" else (2, 2, num_tokens, width)
        self.tokens = nn.Parameter(torch.empty(shape))
        nn.init.trunc_normal_(self.tokens, std=0.02)  # as ViT's class token
        self.fusion = nn.ModuleDict({str(b): TwoWayFusion(hidden_size, num_heads, width)
                                     for b in FUSION_AFTER_BLOCKS}) if entry == "fusion" else None

    @staticmethod
    def _select(tokens: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """tokens (2, 2, k, C), present (B, 2) bool -> (B, 2k, C): per sample, each modality's present or absent
        set."""
        state = (~present).long()  # 0 present, 1 absent
        return torch.cat([tokens[m, state[:, m]] for m in range(2)], dim=1)

    def select(self, present: torch.Tensor, block: int | None = None) -> torch.Tensor:
        """The prior tokens (B, 2k, C) samples with modalities ``present`` (B, 2) get (at ``block`` for "tokens")."""
        tokens = self.tokens[block] if self.entry == "tokens" else self.tokens
        return self._select(tokens, present.to(tokens.device))

    def run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor, n: int, present: torch.Tensor
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the ViT ``blocks`` on tokens ``x`` (B, M, C), of which the first ``n`` are the decoder's, with the
        priors; returns the last block's output without prior tokens (B, M, C) and each block's first n tokens."""
        hidden_states = []
        priors = None if self.entry == "tokens" else self.select(present)
        for i, blk in enumerate(blocks):
            if self.entry == "tokens":
                m = x.shape[1]
                x = blk(torch.cat([x, self.select(present, i)], dim=1))[:, :m]
            else:
                x = blk(x)
                if str(i) in self.fusion:
                    x, priors = self.fusion[str(i)](x, priors)
            hidden_states.append(x[:, :n])
        return x, hidden_states
