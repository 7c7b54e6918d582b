"""The uni-modal base network: MONAI's UNETR built from a preset's ``model`` section."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from monai.networks.nets import UNETR
from monai.networks.nets.vit import ViT

__all__ = ["MODALITIES", "UNETR_PATCH_SIZE", "build_unetr", "check_img_size", "enable_sdpa", "freeze_unused_norms",
           "unetr_kwargs"]

MODALITIES = ("CT", "PET")
"""Modalities PEMMA knows, in the default channel order: the base model is CT-only, PET is added."""

UNETR_PATCH_SIZE = 16
"""MONAI's UNETR fixes the ViT patch size (and 12 transformer layers)."""

_MODEL_KEYS = (
    "hidden_size",
    "mlp_dim",
    "num_heads",
    "feature_size",
    "proj_type",
    "norm_name",
    "res_block",
    "dropout_rate",
    "qkv_bias",
)


def check_img_size(img_size: Sequence[int]) -> tuple[int, ...]:
    """Return ``img_size`` as a 3-tuple; raise ValueError unless every side is a positive multiple of 16."""
    size = tuple(int(s) for s in img_size)
    if len(size) != 3 or any(s <= 0 or s % UNETR_PATCH_SIZE for s in size):
        raise ValueError(
            f"UNETR needs a 3D patch size whose sides are multiples of {UNETR_PATCH_SIZE}, got {list(img_size)}"
        )
    return size


def unetr_kwargs(model: Mapping[str, Any]) -> dict[str, Any]:
    """Map a preset's ``model`` section to UNETR keyword arguments; unknown or missing keys raise ValueError."""
    if model.get("architecture", "UNETR") != "UNETR":
        raise ValueError(f"only the UNETR architecture is supported, got {model['architecture']!r}")
    missing = [k for k in _MODEL_KEYS if k not in model]
    unknown = sorted(set(model) - set(_MODEL_KEYS) - {"architecture"})
    if missing or unknown:
        raise ValueError(f"preset 'model' section: missing keys {missing}, unknown keys {unknown}")
    kwargs = {k: model[k] for k in _MODEL_KEYS}
    if isinstance(kwargs["norm_name"], list):  # JSON has no tuples: ["instance", {...}]
        kwargs["norm_name"] = tuple(kwargs["norm_name"])
    return kwargs


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


def build_unetr(model: Mapping[str, Any], in_channels: int, out_channels: int, img_size: Sequence[int]) -> UNETR:
    """Plain MONAI UNETR (state-dict names are MONAI's), e.g. the CT-only base that PEMMA adapts.

    Args:
        model: preset ``model`` section (hidden_size, mlp_dim, num_heads, feature_size, ...).
        in_channels: input channels (1 for the CT base).
        out_channels: segmentation classes including background.
        img_size: training patch size (D, H, W), each a multiple of 16.
    """
    net = UNETR(
        in_channels=in_channels, out_channels=out_channels, img_size=check_img_size(img_size), **unetr_kwargs(model)
    )
    enable_sdpa(net.vit)
    freeze_unused_norms(net.vit)
    return net
