"""Presets' ``model`` sections for the peer networks the product runs beside PEMMA (``pemma compare``).

- "nnUNet": nnU-Net's own U-Net of the configuration the preset inherits (e.g. 3d_fullres with 2 channels); the
  preset sets patch, batch and iteration budget, nnU-Net keeps its network, loss and deep supervision.
- "H2ASeg": the dual-branch residual U-Net with MCSA and TAMW (`h2aseg.py`).
- "SliceInteraction25D": nnU-Net's 2-D U-Net of the inherited ``2d`` configuration over k neighbouring slices of
  each modality, behind a slice interaction module (`slice_interaction.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar


def _fields(cls: type, model: Mapping[str, Any]) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    missing = [k for k, f in fields.items() if f.default is dataclasses.MISSING and k not in model]
    unknown = sorted(set(model) - set(fields) - {"architecture"})
    if missing or unknown:
        raise ValueError(f"'model' section: missing keys {missing}, unknown keys {unknown}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in model.items() if k != "architecture"}


def _positive_ints(values: Any, what: str, length: int | None = None) -> tuple[int, ...]:
    if not isinstance(values, (list, tuple)) or not values or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values) or (
            length is not None and len(values) != length):
        raise ValueError(f"{what} must be {length or 'some'} positive integers, got {values!r}")
    return tuple(values)


def _to_json(spec: Any) -> dict[str, Any]:
    return {"architecture": spec.architecture,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(spec).items()}}


@dataclass(frozen=True)
class NNUNetSpec:
    """nnU-Net's own U-Net, as planned for the inherited configuration; optionally narrower, with nnU-Net's own
    width rule (stage k has min(base * 2**k, max) features; its planner's base is 32 and its maximum 320) at a
    smaller base and maximum, for quick CPU runs."""

    base_num_features: int | None = None
    max_num_features: int | None = None

    architecture: ClassVar[str] = "nnUNet"
    network_class_name: ClassVar[str | None] = None  # nnU-Net's own U-Net of the inherited configuration

    @classmethod
    def parse(cls, model: Mapping[str, Any]) -> "NNUNetSpec":
        spec = cls(**_fields(cls, model))
        if (spec.base_num_features is None) != (spec.max_num_features is None):
            raise ValueError("nnU-Net's U-Net: base_num_features and max_num_features go together")
        if spec.base_num_features is not None:
            _positive_ints([spec.base_num_features, spec.max_num_features], "base_num_features and max_num_features")
        return spec

    def narrowed(self, planned: Mapping[str, Any]) -> dict[str, Any] | None:
        """nnU-Net's planned "architecture" entry with this width, or None to keep the planned one."""
        if self.base_num_features is None:
            return None
        kwargs = dict(planned["arch_kwargs"])
        kwargs["features_per_stage"] = [min(self.base_num_features * 2**k, self.max_num_features)
                                        for k in range(kwargs["n_stages"])]
        return {**planned, "arch_kwargs": kwargs}

    def check_patch_size(self, patch_size: Sequence[int]) -> tuple[int, ...]:
        size = _positive_ints(list(patch_size), "the patch size")
        if len(size) not in (2, 3):
            raise ValueError(f"nnU-Net's U-Net takes a 2-D or 3-D patch size, got {list(patch_size)}")
        return size

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in _to_json(self).items() if v is not None}  # the planned width: as before


@dataclass(frozen=True)
class H2ASegSpec:
    """H2ASeg (MICCAI 2024): widths per level (paper 8-128) and the MCSA window in the patch's axis order (paper
    8x8x4 for H x W x D, i.e. (4, 8, 8) in nnU-Net's (z, y, x)); windows are clipped to each level's size."""

    widths: tuple[int, ...] = (8, 16, 32, 64, 128)
    window: tuple[int, ...] = (4, 8, 8)
    norm_name: str = "instance"

    architecture: ClassVar[str] = "H2ASeg"
    network_class_name: ClassVar[str | None] = "nnunetv2_pemma.networks.peers.h2aseg.H2ASeg"

    @classmethod
    def parse(cls, model: Mapping[str, Any]) -> "H2ASegSpec":
        spec = cls(**_fields(cls, model))
        _positive_ints(spec.widths, "H2ASeg widths")
        if len(spec.widths) < 2:
            raise ValueError(f"H2ASeg needs at least 2 levels (widths), got {list(spec.widths)}")
        _positive_ints(spec.window, "H2ASeg window", 3)
        return spec

    @property
    def divisor(self) -> int:
        """Every patch side is a multiple of this: each level halves the patch, and nnU-Net's deep-supervision
        targets (the label map scaled by 1/2**k) must match the level's prediction exactly."""
        return 2 ** (len(self.widths) - 1)

    def check_patch_size(self, patch_size: Sequence[int]) -> tuple[int, ...]:
        size = _positive_ints(list(patch_size), "the patch size")
        if len(size) != 3 or any(s % self.divisor for s in size):
            raise ValueError(f"H2ASeg with {len(self.widths)} levels needs a 3-D patch size whose sides are "
                             f"multiples of {self.divisor}, got {list(patch_size)}")
        return size

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)


@dataclass(frozen=True)
class SliceInteractionSpec:
    """The 2.5D slice-interaction network: `slices` neighbouring slices per modality (odd; the centre slice is
    predicted), the slice interaction module's channel-attention reduction and spatial-attention kernel."""

    slices: int = 5
    reduction: int = 2
    spatial_kernel: int = 7

    architecture: ClassVar[str] = "SliceInteraction25D"
    network_class_name: ClassVar[str | None] = None  # nnU-Net's own U-Net of the inherited configuration

    @classmethod
    def parse(cls, model: Mapping[str, Any]) -> "SliceInteractionSpec":
        spec = cls(**_fields(cls, model))
        _positive_ints([spec.slices, spec.reduction, spec.spatial_kernel], "slices, reduction and spatial_kernel")
        if spec.slices % 2 == 0 or spec.spatial_kernel % 2 == 0:
            raise ValueError(f"slices and spatial_kernel must be odd (a centre slice, a centred kernel), got "
                             f"{spec.slices} and {spec.spatial_kernel}")
        return spec

    def check_patch_size(self, patch_size: Sequence[int]) -> tuple[int, ...]:
        size = _positive_ints(list(patch_size), "the patch size")
        if len(size) != 2:
            raise ValueError(f"the 2.5D network trains on 2-D patches (a configuration inheriting '2d'), got "
                             f"{list(patch_size)}")
        return size

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)


PEER_SPECS = (NNUNetSpec, H2ASegSpec, SliceInteractionSpec)
