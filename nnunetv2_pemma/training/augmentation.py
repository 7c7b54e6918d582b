"""Which of nnU-Net's training transforms run: a preset's optional "data_augmentation" section.

On two CPU cores nnU-Net's full augmentation (spatial transform with rotation and scaling, then intensity
transforms, then mirroring) costs several times the network step of a small UNETR, so a small preset can switch
groups of nnU-Net's own transforms off. Nothing is re-implemented: the trainer builds nnU-Net's pipeline and
this module drops the transforms of the groups the preset turns off. A preset without the section keeps
nnU-Net's full pipeline.

    "data_augmentation": {"spatial": false, "intensity": false, "mirror": true}
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform


SECTION = "data_augmentation"

# nnU-Net's transforms by group; the ones not listed (label clean-up, deep-supervision targets, regions) always run
GROUPS: dict[str, tuple[type[BasicTransform], ...]] = {
    "spatial": (SpatialTransform, Convert3DTo2DTransform, Convert2DTo3DTransform),
    "intensity": (GaussianNoiseTransform, GaussianBlurTransform, MultiplicativeBrightnessTransform,
                  ContrastTransform, SimulateLowResolutionTransform, GammaTransform),
    "mirror": (MirrorTransform,),
}


@dataclass(frozen=True)
class AugmentationChoice:
    """Which groups of nnU-Net's training transforms run (all by default, as in nnU-Net)."""

    spatial: bool = True  # rotation and scaling; off: patches are cut at the final size, as nnUNetTrainerNoDA does
    intensity: bool = True  # noise, blur, brightness, contrast, simulated low resolution, gamma
    mirror: bool = True

    @classmethod
    def parse(cls, section: Any) -> "AugmentationChoice":
        """The preset's section; ValueError unless it maps some of the groups to true/false."""
        names = {f.name for f in fields(cls)}
        if not isinstance(section, dict) or set(section) - names or \
                not all(isinstance(v, bool) for v in section.values()):
            raise ValueError(f"'{SECTION}' must map some of {sorted(names)} to true/false, got {section!r}")
        return cls(**section)

    def dropped(self) -> tuple[type[BasicTransform], ...]:
        return tuple(t for group, types in GROUPS.items() if not getattr(self, group) for t in types)


def _inner(transform: BasicTransform) -> BasicTransform:
    return transform.transform if isinstance(transform, RandomTransform) else transform


def select_transforms(pipeline: ComposeTransforms, choice: AugmentationChoice) -> ComposeTransforms:
    """nnU-Net's training pipeline without the transforms of the groups `choice` turns off."""
    dropped = choice.dropped()
    return ComposeTransforms([t for t in pipeline.transforms if not isinstance(_inner(t), dropped)])
