"""5-fold cross-validation splits stratified by HECKTOR centre.

nnU-Net's default splits are a plain random KFold, which can leave a small centre out of some validation folds.
Ours spread each centre's cases round-robin over the folds (after a seeded shuffle), so every centre with at least
five cases is validated in every fold. They are stored next to the raw data as `splits_final.json`, the file
nnU-Net's experiment planner copies to `nnUNet_preprocessed/DatasetXXX/` (where training reads it);
`write_splits_to_preprocessed` makes the same copy for `pemma plans transfer`, which does not run the planner.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Mapping

from nnunetv2_pemma.errors import PlansError

SPLITS_FILE = "splits_final.json"  # the name nnU-Net reads, in raw (planner) and preprocessed (trainer) folders
N_FOLDS = 5
SEED = 12345  # the seed nnU-Net uses for its own random splits


def make_center_splits(case_centers: Mapping[str, str], n_folds: int = N_FOLDS,
                       seed: int = SEED) -> list[dict[str, list[str]]]:
    """Folds as [{"train": [...], "val": [...]}]: every case is in exactly one val fold, centres spread evenly.

    The fold counter carries on from one centre to the next, so fold sizes differ by at most one case overall.
    """
    by_center: dict[str, list[str]] = defaultdict(list)
    for case, center in case_centers.items():
        by_center[center].append(case)
    rng = random.Random(seed)
    val: list[list[str]] = [[] for _ in range(n_folds)]
    fold = 0
    for center in sorted(by_center):
        cases = sorted(by_center[center])
        rng.shuffle(cases)
        for case in cases:
            val[fold].append(case)
            fold = (fold + 1) % n_folds
    return [{"train": sorted(set(case_centers) - set(v)), "val": sorted(v)} for v in val]


def write_splits_to_preprocessed(raw_dataset_dir: Path, preprocessed_dataset_dir: Path) -> Path | None:
    """Copy the raw dataset's centre-stratified splits to the preprocessed folder with nnU-Net's planner's own
    function, which keeps a splits file already there if its folds agree with the raw ones.

    Returns the preprocessed splits file, or None when the dataset has no splits file (fewer than five training
    cases, too few for five folds: our trainers then say to train fold `all`).
    """
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import _maybe_copy_splits_file

    source = Path(raw_dataset_dir) / SPLITS_FILE
    if not source.is_file():
        return None
    target = Path(preprocessed_dataset_dir) / SPLITS_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        _maybe_copy_splits_file(str(source), str(target))
    except (AssertionError, IndexError, KeyError):  # nnU-Net's check of an existing file fails without a message
        raise PlansError(f"{target} has other folds than {source}: delete it to train on the raw dataset's "
                         f"splits") from None
    return target


def save_splits(splits: list[dict[str, list[str]]], dataset_dir: Path) -> Path:
    """Write splits as the raw dataset's splits_final.json, for nnU-Net's planner to copy."""
    path = Path(dataset_dir) / SPLITS_FILE
    path.write_text(json.dumps(splits, indent=2))
    return path
