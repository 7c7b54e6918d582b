"""SwinUNETR: MONAI's network as the CT base (extended PEMMA, Swin backbone)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:  # MONAI's import takes seconds; commands that only read presets (`pemma plans`) skip it
    from monai.networks.nets import SwinUNETR

from nnunetv2_pemma.networks.mismatch import shape

SWIN_PATCH_SIZE = 2
"""Patch embedding stride; MONAI's default, as in the official SwinUNETR."""

SWIN_DIVISOR = SWIN_PATCH_SIZE**5
"""Patch embedding plus four patch-merging stages halve the grid five times: every side must be a multiple of 32."""

_NUM_STAGES = 4


def _is_instance_norm(norm_name: Any) -> bool:
    name = norm_name[0] if isinstance(norm_name, (list, tuple)) else norm_name
    return str(name).lower() == "instance"


@dataclass(frozen=True)
class SwinUNETRSpec:
    """A preset's ``model`` section for MONAI's SwinUNETR (``architecture`` "SwinUNETR"); the optional keys take
    MONAI's defaults."""

    feature_size: int
    depths: tuple[int, ...]  # blocks per stage, 4 stages
    num_heads: tuple[int, ...]  # heads per stage
    norm_name: str | tuple
    drop_rate: float
    attn_drop_rate: float
    dropout_path_rate: float
    window_size: int | tuple[int, ...] = 7
    qkv_bias: bool = True
    mlp_ratio: float = 4.0
    use_v2: bool = False
    use_checkpoint: bool = False
    normalize: bool = True
    patch_norm: bool = False
    downsample: str = "merging"

    architecture: ClassVar[str] = "SwinUNETR"
    network_class_name: ClassVar[str | None] = "monai.networks.nets.SwinUNETR"

    @classmethod
    def parse(cls, model: Mapping[str, Any]) -> "SwinUNETRSpec":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        missing = [k for k, f in fields.items() if f.default is dataclasses.MISSING and k not in model]
        unknown = sorted(set(model) - set(fields) - {"architecture"})
        if missing or unknown:
            raise ValueError(f"'model' section: missing keys {missing}, unknown keys {unknown}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in model.items() if k != "architecture"}
        spec = cls(**kwargs)
        if len(spec.depths) != _NUM_STAGES or len(spec.num_heads) != _NUM_STAGES or min(spec.depths) < 1:
            raise ValueError(f"SwinUNETR has {_NUM_STAGES} stages: depths {list(spec.depths)} and num_heads "
                             f"{list(spec.num_heads)}")
        if spec.feature_size % 12:
            raise ValueError(f"SwinUNETR feature_size must be a multiple of 12, got {spec.feature_size}")
        bad = [(spec.feature_size * 2**i, h) for i, h in enumerate(spec.num_heads) if (spec.feature_size * 2**i) % h]
        if bad:
            raise ValueError(f"num_heads {list(spec.num_heads)} must divide the stage widths; (width, heads) "
                             f"failing: {bad}")
        return spec

    def check_patch_size(self, img_size: Sequence[int]) -> tuple[int, ...]:
        """``img_size`` as a 3-tuple; ValueError unless every side is a positive multiple of 32.

        With instance norm the bottleneck (``img_size / 32``) must also hold more than one voxel, i.e. one side of
        at least 64: instance norm cannot train on a single voxel (32^3 fails in training, not in inference).
        """
        size = tuple(int(s) for s in img_size)
        if len(size) != 3 or any(s <= 0 or s % SWIN_DIVISOR for s in size):
            raise ValueError(
                f"SwinUNETR needs a 3D patch size whose sides are multiples of {SWIN_DIVISOR} "
                f"(patch embedding and 4 merging stages halve it 5 times), got {list(img_size)}"
            )
        if _is_instance_norm(self.norm_name) and all(s == SWIN_DIVISOR for s in size):
            raise ValueError(
                f"SwinUNETR patch size {list(img_size)} leaves a 1x1x1 bottleneck, which instance norm cannot train "
                f"on: make at least one side {2 * SWIN_DIVISOR}"
            )
        return size

    def kwargs(self) -> dict[str, Any]:
        """MONAI SwinUNETR's keyword arguments."""
        # SDPA for the windowed attention at inference (same result, less memory); MONAI drops attention dropout there
        return {**dataclasses.asdict(self), "use_flash_attention": self.attn_drop_rate == 0.0,
                "patch_size": SWIN_PATCH_SIZE, "spatial_dims": 3}

    def to_json(self) -> dict[str, Any]:
        return {"architecture": self.architecture,
                **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}}


def build_swin_unetr(spec: SwinUNETRSpec, in_channels: int, out_channels: int, img_size: Sequence[int]
                     ) -> SwinUNETR:
    """Plain MONAI SwinUNETR (state-dict names are MONAI's), e.g. the CT-only base that PEMMA adapts.

    MONAI >= 1.5 builds SwinUNETR without an ``img_size``; it is only checked here (the training patch size).

    Args:
        spec: the preset's model section.
        in_channels: input channels (1 for the CT base, 2 for early fusion).
        out_channels: segmentation classes including background.
        img_size: training patch size (D, H, W), each a multiple of 32.
    """
    from monai.networks.nets import SwinUNETR

    spec.check_patch_size(img_size)
    return SwinUNETR(in_channels=in_channels, out_channels=out_channels, **spec.kwargs())


# --- explaining an incompatible base ------------------------------------------------------------------------------

_BLOCK_KEY = re.compile(r"^swinViT\.layers(\d)\.0\.blocks\.(\d+)\.")


def _depths(keys: Sequence[str]) -> list[int]:
    depth = [0] * 4
    for k in keys:
        m = _BLOCK_KEY.match(k)
        if m and 1 <= int(m[1]) <= 4:
            depth[int(m[1]) - 1] = max(depth[int(m[1]) - 1], int(m[2]) + 1)
    return depth


def _stage_table_shapes(sd: Mapping[str, torch.Tensor]) -> list[tuple[int, ...] | None]:
    key = "swinViT.layers{}.0.blocks.0.attn.relative_position_bias_table"
    return [tuple(sd[key.format(n)].shape) if key.format(n) in sd else None for n in range(1, 5)]


def _window(rows: int) -> str:
    side = round(rows ** (1 / 3))
    return str((side + 1) // 2) if side**3 == rows else f"? ({rows} relative positions)"


def explain_swin_mismatch(sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list[str]:
    """Hyper-parameters behind the key and shape differences (base vs network)."""
    out = []
    if any(k.startswith("vit.") for k in sd):
        out.append("it is a UNETR (vit.* keys), not a SwinUNETR: use PEMMAUNETR")
    key = "swinViT.patch_embed.proj.weight"
    if key in sd and key in expected:
        b, n = tuple(sd[key].shape), tuple(expected[key].shape)
        if b[1] != n[1]:
            out.append(f"input channels {b[1]} vs {n[1]}: the base must be a single-channel CT SwinUNETR")
        if b[0] != n[0]:
            out.append(f"feature size {b[0]} vs {n[0]}")
        if b[2:] != n[2:]:
            out.append(f"patch size {shape(b[2:])} vs {shape(n[2:])}")
    depths_b, depths_n = _depths(list(sd)), _depths(list(expected))
    if any(depths_b) and depths_b != depths_n:
        out.append(f"depths {depths_b} vs {depths_n}")
    tables_b, tables_n = _stage_table_shapes(sd), _stage_table_shapes(expected)
    if all(tables_b) and all(tables_n):
        heads_b, heads_n = [t[1] for t in tables_b], [t[1] for t in tables_n]  # type: ignore[index]
        if heads_b != heads_n:
            out.append(f"num_heads {heads_b} vs {heads_n}")
        if tables_b[0][0] != tables_n[0][0]:  # type: ignore[index]
            out.append(f"window size {_window(tables_b[0][0])} vs {_window(tables_n[0][0])}")  # type: ignore[index]
    for flag, test in (
        ("use_v2", lambda k: k.startswith("swinViT.layers1c.")),
        ("qkv_bias", lambda k: k.endswith(".attn.qkv.bias")),
    ):
        b, n = any(map(test, sd)), any(map(test, expected))
        if any(k.startswith("swinViT.") for k in sd) and b != n:
            out.append(f"{flag} {b} vs {n}")
    key = "out.conv.conv.weight"
    if key in sd and key in expected and sd[key].shape[0] != expected[key].shape[0]:
        out.append(f"output channels {sd[key].shape[0]} vs {expected[key].shape[0]}")
    return out
