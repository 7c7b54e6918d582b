"""The uni-modal SwinUNETR base: MONAI's SwinUNETR built from a preset's ``model`` section."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from monai.networks.nets import SwinUNETR

__all__ = ["SWIN_DIVISOR", "SWIN_PATCH_SIZE", "build_swin_unetr", "check_swin_img_size", "swin_unetr_kwargs"]

SWIN_PATCH_SIZE = 2
"""Patch embedding stride; MONAI's default, as in the official SwinUNETR."""

SWIN_DIVISOR = SWIN_PATCH_SIZE**5
"""Patch embedding plus four patch-merging stages halve the grid five times: every side must be a multiple of 32."""

_REQUIRED_KEYS = (
    "feature_size",
    "depths",
    "num_heads",
    "norm_name",
    "drop_rate",
    "attn_drop_rate",
    "dropout_path_rate",
)
_OPTIONAL_KEYS: dict[str, Any] = {
    "window_size": 7,
    "qkv_bias": True,
    "mlp_ratio": 4.0,
    "use_v2": False,
    "use_checkpoint": False,
    "normalize": True,
    "patch_norm": False,
    "downsample": "merging",
}
_NUM_STAGES = 4


def _is_instance_norm(norm_name: Any) -> bool:
    name = norm_name[0] if isinstance(norm_name, (list, tuple)) else norm_name
    return str(name).lower() == "instance"


def check_swin_img_size(img_size: Sequence[int], norm_name: Any = "instance") -> tuple[int, ...]:
    """Return ``img_size`` as a 3-tuple; raise ValueError unless every side is a positive multiple of 32.

    With instance norm the bottleneck (``img_size / 32``) must also hold more than one voxel, i.e. one side of at
    least 64: instance norm cannot train on a single voxel (32^3 fails in training, not in inference).
    """
    size = tuple(int(s) for s in img_size)
    if len(size) != 3 or any(s <= 0 or s % SWIN_DIVISOR for s in size):
        raise ValueError(
            f"SwinUNETR needs a 3D patch size whose sides are multiples of {SWIN_DIVISOR} "
            f"(patch embedding and 4 merging stages halve it 5 times), got {list(img_size)}"
        )
    if _is_instance_norm(norm_name) and all(s == SWIN_DIVISOR for s in size):
        raise ValueError(
            f"SwinUNETR patch size {list(img_size)} leaves a 1x1x1 bottleneck, which instance norm cannot train on: "
            f"make at least one side {2 * SWIN_DIVISOR}"
        )
    return size


def swin_unetr_kwargs(model: Mapping[str, Any]) -> dict[str, Any]:
    """Map a preset's ``model`` section to SwinUNETR keyword arguments; unknown or missing keys raise ValueError.

    Required: feature_size, depths, num_heads (one per stage, 4 stages), norm_name, drop_rate, attn_drop_rate,
    dropout_path_rate. Optional (MONAI's defaults): window_size 7, qkv_bias true, mlp_ratio 4, use_v2 false,
    use_checkpoint false, normalize true, patch_norm false, downsample "merging".
    """
    if model.get("architecture") != "SwinUNETR":
        raise ValueError(f"expected a model section with architecture 'SwinUNETR', got {model.get('architecture')!r}")
    missing = [k for k in _REQUIRED_KEYS if k not in model]
    unknown = sorted(set(model) - set(_REQUIRED_KEYS) - set(_OPTIONAL_KEYS) - {"architecture"})
    if missing or unknown:
        raise ValueError(f"preset 'model' section: missing keys {missing}, unknown keys {unknown}")
    kwargs = {**_OPTIONAL_KEYS, **{k: v for k, v in model.items() if k != "architecture"}}
    if isinstance(kwargs["norm_name"], list):  # JSON has no tuples: ["instance", {...}]
        kwargs["norm_name"] = tuple(kwargs["norm_name"])
    depths, heads, feature = tuple(kwargs["depths"]), tuple(kwargs["num_heads"]), kwargs["feature_size"]
    if len(depths) != _NUM_STAGES or len(heads) != _NUM_STAGES or min(depths) < 1:
        raise ValueError(f"SwinUNETR has {_NUM_STAGES} stages: depths {list(depths)} and num_heads {list(heads)}")
    if feature % 12:
        raise ValueError(f"SwinUNETR feature_size must be a multiple of 12, got {feature}")
    bad = [(feature * 2**i, h) for i, h in enumerate(heads) if (feature * 2**i) % h]
    if bad:
        raise ValueError(f"num_heads {list(heads)} must divide the stage widths; (width, heads) failing: {bad}")
    kwargs["depths"], kwargs["num_heads"] = depths, heads
    if isinstance(kwargs["window_size"], list):
        kwargs["window_size"] = tuple(kwargs["window_size"])
    # SDPA for the windowed attention at inference (same result, less memory); MONAI drops attention dropout there
    kwargs["use_flash_attention"] = kwargs["attn_drop_rate"] == 0.0
    return {**kwargs, "patch_size": SWIN_PATCH_SIZE, "spatial_dims": 3}


def build_swin_unetr(
    model: Mapping[str, Any], in_channels: int, out_channels: int, img_size: Sequence[int]
) -> SwinUNETR:
    """Plain MONAI SwinUNETR (state-dict names are MONAI's), e.g. the CT-only base that PEMMA adapts.

    MONAI >= 1.5 builds SwinUNETR without an ``img_size``; it is only checked here (the training patch size).

    Args:
        model: preset ``model`` section (architecture "SwinUNETR", feature_size, depths, num_heads, ...).
        in_channels: input channels (1 for the CT base, 2 for early fusion).
        out_channels: segmentation classes including background.
        img_size: training patch size (D, H, W), each a multiple of 32.
    """
    kwargs = swin_unetr_kwargs(model)
    check_swin_img_size(img_size, kwargs["norm_name"])
    return SwinUNETR(in_channels=in_channels, out_channels=out_channels, **kwargs)
