"""The "pemma" block of an nnU-Net plans configuration (written by `pemma plans add/transfer`)."""

from __future__ import annotations

import math
import os
from typing import Any

import torch

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


CPU_THREADS_ENV = "PEMMA_CPU_THREADS"


def limit_cpu_threads(device: torch.device) -> None:
    """On CPU, use PEMMA_CPU_THREADS threads when it is set.

    nnUNetv2_train gives torch every core on CPU (no option changes that), so two trainings run side by side
    fight over the cores; two one-thread trainings together do more iterations per second than one two-thread
    training (benchmarks/iteration_time.py). `pemma reproduce` sets it when it runs jobs in parallel on CPU.
    """
    value = os.environ.get(CPU_THREADS_ENV)
    if device.type != "cpu" or not value:
        return
    if not value.isdigit() or int(value) < 1:
        raise PlansError(f"{CPU_THREADS_ENV}={value!r}: expected a positive number of threads")
    torch.set_num_threads(int(value))
