"""UNETR: MONAI's network as the CT base, and its PEMMA form with PET tokens (paper, Sec. 2.2)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:  # MONAI's import takes seconds; commands that only read presets (`pemma plans`) skip it
    from monai.networks.nets import UNETR
    from monai.networks.nets.vit import ViT

from nnunetv2_pemma.networks.mismatch import shape

UNETR_PATCH_SIZE = 16
"""MONAI's UNETR fixes the ViT patch size (and 12 transformer layers)."""


@dataclass(frozen=True)
class UNETRSpec:
    """A preset's ``model`` section for MONAI's UNETR (``architecture`` "UNETR")."""

    hidden_size: int
    mlp_dim: int
    num_heads: int
    feature_size: int
    proj_type: str
    norm_name: str | tuple
    res_block: bool
    dropout_rate: float
    qkv_bias: bool

    architecture: ClassVar[str] = "UNETR"
    network_class_name: ClassVar[str | None] = "monai.networks.nets.UNETR"

    @classmethod
    def parse(cls, model: Mapping[str, Any]) -> "UNETRSpec":
        keys = [f.name for f in dataclasses.fields(cls)]
        missing = [k for k in keys if k not in model]
        unknown = sorted(set(model) - set(keys) - {"architecture"})
        if missing or unknown:
            raise ValueError(f"'model' section: missing keys {missing}, unknown keys {unknown}")
        kwargs = {k: model[k] for k in keys}
        if isinstance(kwargs["norm_name"], list):  # JSON has no tuples: ["instance", {...}]
            kwargs["norm_name"] = tuple(kwargs["norm_name"])
        if kwargs["hidden_size"] % kwargs["num_heads"]:
            raise ValueError(f"hidden_size {kwargs['hidden_size']} must be divisible by num_heads "
                             f"{kwargs['num_heads']}")
        return cls(**kwargs)

    def check_patch_size(self, img_size: Sequence[int]) -> tuple[int, ...]:
        """``img_size`` as a 3-tuple; ValueError unless every side is a positive multiple of 16."""
        size = tuple(int(s) for s in img_size)
        if len(size) != 3 or any(s <= 0 or s % UNETR_PATCH_SIZE for s in size):
            raise ValueError(f"UNETR needs a 3D patch size whose sides are multiples of {UNETR_PATCH_SIZE}, "
                             f"got {list(img_size)}")
        return size

    def kwargs(self) -> dict[str, Any]:
        """MONAI UNETR's keyword arguments."""
        return dataclasses.asdict(self)

    def to_json(self) -> dict[str, Any]:
        out = {"architecture": self.architecture, **self.kwargs()}
        out["norm_name"] = list(self.norm_name) if isinstance(self.norm_name, tuple) else self.norm_name
        return out


def enable_sdpa(vit: ViT) -> None:
    """Route every block's attention through ``F.scaled_dot_product_attention`` (same result, less memory).

    Only done without attention dropout: MONAI passes ``dropout_p`` to SDPA even in eval mode.
    """
    for blk in vit.blocks:
        if blk.attn.dropout_rate == 0.0 and not blk.attn.save_attn:
            blk.attn.use_flash_attention = True


def freeze_unused_norms(vit: ViT) -> None:
    """MONAI's TransformerBlock always creates ``norm_cross_attn``; without cross-attention it is never used.
    Unused trainable parameters make DistributedDataParallel fail, so they do not train."""
    for blk in vit.blocks:
        if not blk.with_cross_attention:
            blk.norm_cross_attn.requires_grad_(False)


def build_unetr(spec: UNETRSpec, in_channels: int, out_channels: int, img_size: Sequence[int]) -> UNETR:
    """Plain MONAI UNETR (state-dict names are MONAI's), e.g. the CT-only base that PEMMA adapts.

    Args:
        spec: the preset's model section.
        in_channels: input channels (1 for the CT base).
        out_channels: segmentation classes including background.
        img_size: training patch size (D, H, W), each a multiple of 16.
    """
    from monai.networks.nets import UNETR

    net = UNETR(in_channels=in_channels, out_channels=out_channels, img_size=spec.check_patch_size(img_size),
                **spec.kwargs())
    enable_sdpa(net.vit)
    freeze_unused_norms(net.vit)
    return net


@dataclass
class UNETREncoding:
    """What the ViT gives the decoder: the CT tokens after blocks 3, 6 and 9, (B, N, hidden) each, and after the
    final norm, (B, N, hidden)."""

    hidden_states: list[torch.Tensor]
    tokens: torch.Tensor


def _grid(n_patches: int) -> str:
    side = round(n_patches ** (1 / 3))
    return f"{16 * side}^3" if side**3 == n_patches else f"{n_patches} patches of 16^3"


def _explain(key: str, base: tuple[int, ...], net: tuple[int, ...], img_size: tuple[int, ...]) -> str | None:
    """Name the hyper-parameter behind a shape difference of a telltale key (base vs network)."""
    if key == "vit.norm.weight":
        return f"hidden size {base[0]} vs {net[0]}"
    if key == "vit.patch_embedding.position_embeddings" and base[1] != net[1]:
        size = f"{img_size[0]}^3" if len(set(img_size)) == 1 else shape(img_size)
        return f"position embeddings {shape(base)} vs {shape(net)}: patch size differs ({_grid(base[1])} vs {size})"
    if key == "encoder1.layer.conv1.conv.weight" and base[1] != net[1]:
        return f"input channels {base[1]} vs {net[1]}: the base must be a single-channel CT UNETR"
    if key == "encoder1.layer.conv1.conv.weight" and base[0] != net[0]:
        return f"feature size {base[0]} vs {net[0]}"
    if key == "vit.blocks.0.mlp.linear1.weight" and base[0] != net[0]:
        return f"mlp dim {base[0]} vs {net[0]}"
    if key == "out.conv.conv.weight" and base[0] != net[0]:
        return f"output channels {base[0]} vs {net[0]}"
    return None
