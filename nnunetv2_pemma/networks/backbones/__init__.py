"""The backbones PEMMA adapts, by the name a preset's ``model.architecture`` gives them.

Each backbone module holds its typed model section (parse, patch-size rule, MONAI keyword arguments) and the
builder of the plain MONAI network; its PEMMA form (modality slots) lives in ``nnunetv2_pemma.networks``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nnunetv2_pemma.networks.backbones.swin import SwinUNETRSpec
from nnunetv2_pemma.networks.backbones.unetr import UNETRSpec

ModelSpec = UNETRSpec | SwinUNETRSpec
SPECS: dict[str, type[UNETRSpec] | type[SwinUNETRSpec]] = {UNETRSpec.architecture: UNETRSpec,
                                                            SwinUNETRSpec.architecture: SwinUNETRSpec}


def parse_model(model: Any) -> ModelSpec:
    """A preset's ``model`` section as the typed section of its architecture (default UNETR); ValueError if not."""
    if not isinstance(model, Mapping):
        raise ValueError(f"'model' must be an object, got {model!r}")
    name = model.get("architecture", "UNETR")
    if name not in SPECS:
        raise ValueError(f"model architecture {name!r} is not one of {sorted(SPECS)}")
    return SPECS[name].parse(model)
