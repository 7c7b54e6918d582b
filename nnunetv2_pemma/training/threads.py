"""How many CPU threads a training uses (nnUNetv2_train has no option for it)."""

from __future__ import annotations

import os

import torch

from nnunetv2_pemma.errors import PlansError

CPU_THREADS_ENV = "PEMMA_CPU_THREADS"


def cpu_threads_from_environment() -> int | None:
    """PEMMA_CPU_THREADS as a thread count, or None when it is not set."""
    value = os.environ.get(CPU_THREADS_ENV)
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise PlansError(f"{CPU_THREADS_ENV}={value!r}: expected a positive number of threads")
    return int(value)


def limit_cpu_threads(device: torch.device) -> None:
    """On CPU, use PEMMA_CPU_THREADS threads when it is set.

    nnUNetv2_train gives torch every core on CPU (no option changes that), so two trainings run side by side
    fight over the cores; two one-thread trainings together do more iterations per second than one two-thread
    training (benchmarks/iteration_time.py). `pemma reproduce` sets it when it runs jobs in parallel on CPU.
    """
    threads = cpu_threads_from_environment()
    if device.type == "cpu" and threads is not None:
        torch.set_num_threads(threads)
