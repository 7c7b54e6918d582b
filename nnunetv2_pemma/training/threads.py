"""How many CPU threads a training uses (nnUNetv2_train has no option for it)."""

from __future__ import annotations

import os

import torch

from nnunetv2_pemma.errors import PlansError

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
