"""The backbones PEMMA adapts, and the peer networks it is compared with, by a preset's ``model.architecture``.

Each backbone module holds its typed model section (parse, patch-size rule, MONAI keyword arguments) and the
builder of the plain MONAI network; its PEMMA form (modality slots) lives in ``nnunetv2_pemma.networks``. The
peers' sections live in ``nnunetv2_pemma.networks.peers.specs``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nnunetv2_pemma.networks.backbones.swin import SwinUNETRSpec
from nnunetv2_pemma.networks.backbones.unetr import UNETRSpec
from nnunetv2_pemma.networks.peers.specs import PEER_SPECS, H2ASegSpec, NNUNetSpec, SliceInteractionSpec

ModelSpec = UNETRSpec | SwinUNETRSpec | NNUNetSpec | H2ASegSpec | SliceInteractionSpec
SPECS: dict[str, type[ModelSpec]] = {spec.architecture: spec for spec in (UNETRSpec, SwinUNETRSpec, *PEER_SPECS)}


def parse_model(model: Any) -> ModelSpec:
    """A preset's ``model`` section as the typed section of its architecture (default UNETR); ValueError if not."""
    if not isinstance(model, Mapping):
        raise ValueError(f"'model' must be an object, got {model!r}")
    name = model.get("architecture", "UNETR")
    if name not in SPECS:
        raise ValueError(f"model architecture {name!r} is not one of {sorted(SPECS)}")
    return SPECS[name].parse(model)
