"""The "pemma" block of an nnU-Net plans configuration (written by `pemma plans add/transfer`)."""

from __future__ import annotations

import math
from typing import Any

from nnunetv2_pemma.errors import PlansError
from nnunetv2_pemma.plans import PEMMA_KEY


def pemma_config(configuration_manager: Any) -> dict[str, Any]:
    """The preset (model, adaptation, schedule, input_modalities) stored in an nnU-Net ConfigurationManager."""
    block = configuration_manager.configuration.get(PEMMA_KEY)
    if block is None:
        raise PlansError("this plans configuration has no 'pemma' block: PEMMA trainers need a configuration "
                         "made by `pemma plans add DATASET --preset NAME` (e.g. 3d_unetr), not "
                         f"{configuration_manager.data_identifier}")
    return block


def epochs_from_schedule(schedule: dict[str, Any]) -> tuple[int, int, int]:
    """(num_epochs, iterations per epoch, validation iterations per epoch) for the preset's iteration budget."""
    per_epoch = int(schedule["num_iterations_per_epoch"])
    return (max(1, math.ceil(int(schedule["num_iterations"]) / per_epoch)), per_epoch,
            int(schedule["num_val_iterations_per_epoch"]))
