"""Seeded trainings: the same command on the same machine trains the same weights.

nnUNetv2_train has no seed option, and nnU-Net draws its patches from the global numpy generator, the network's
initial weights (and adapters') from torch's, and augmentation from both. Every trainer of this package seeds
them all from PEMMA_SEED when it is set (MONAI's `set_determinism`: Python, numpy, torch, cuDNN's deterministic
mode). `pemma demo`, `reproduce` and `compare` set it from their `--seed`.

What this covers: nnU-Net's in-process data loading (`nnUNet_n_proc_DA=0`, what the CPU runs use). With augmentation
workers, nnU-Net's NonDetMultiThreadedAugmenter hands batches over in whatever order the workers finish, so the
initial weights are seeded but the batch order is not. Checked with one thread per CPU training (PEMMA_CPU_THREADS=1,
what `pemma reproduce` sets on CPU).
"""

from __future__ import annotations

import os

from nnunetv2_pemma.errors import PlansError

SEED_ENV = "PEMMA_SEED"


def seed_from_environment() -> int | None:
    """The training seed PEMMA_SEED holds, or None when it is unset or empty."""
    value = os.environ.get(SEED_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise PlansError(f"{SEED_ENV}={value!r}: expected a non-negative integer seed")
    return int(value)


def seed_training(rank: int = 0) -> int | None:
    """Seed every generator a training draws from with PEMMA_SEED (plus the DDP rank, so that ranks draw different
    patches); returns the seed used, or None when PEMMA_SEED is unset (nothing is touched)."""
    from monai.utils import set_determinism

    seed = seed_from_environment()
    if seed is None:
        return None
    set_determinism(seed + rank)
    return seed + rank
