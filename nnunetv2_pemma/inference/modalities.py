"""Plans and dataset.json for feeding a PEMMA model a subset of its modalities (C or P from a CP model).

The predictor's preprocessing and the trainer's network builder both read the plans, so a subset of modalities is
expressed there: channel names, per-channel normalisation and the network's input modalities follow the files
given; the network fills the absent modality itself, in normalised space.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

from nnunetv2_pemma.errors import PlansError
from nnunetv2_pemma.plans import PEMMA_KEY


def plans_for_modalities(plans: dict[str, Any], dataset_json: dict[str, Any], configuration: str,
                         modalities: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Plans and dataset.json for input files that hold `modalities` (in channel order).

    Normalisation of each modality comes from the "pemma" block's record of what the model was adapted with, so
    a model last updated on CT alone still takes PET.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    resolved = PlansManager(plans).get_configuration(configuration).configuration
    if PEMMA_KEY not in resolved:
        raise PlansError(f"configuration {configuration} is not a PEMMA configuration")
    known = resolved[PEMMA_KEY].get("modality_normalization", {})
    modalities = [m.upper() for m in modalities]
    if not modalities or len(set(modalities)) != len(modalities) or not set(modalities) <= known.keys():
        raise PlansError(f"--modalities {modalities}: this model knows {sorted(known)}; give a non-empty subset "
                         f"without repeats, in the order of the input files' channels")
    plans, dataset_json = copy.deepcopy(plans), copy.deepcopy(dataset_json)
    plans["foreground_intensity_properties_per_channel"] = {str(i): known[m]["properties"]
                                                            for i, m in enumerate(modalities)}
    cfg = plans["configurations"][configuration]
    cfg["normalization_schemes"] = [known[m]["scheme"] for m in modalities]
    cfg["use_mask_for_norm"] = [False] * len(modalities)
    cfg[PEMMA_KEY] = {**resolved[PEMMA_KEY], "input_modalities": modalities}
    dataset_json["channel_names"] = {str(i): m for i, m in enumerate(modalities)}
    return plans, dataset_json
