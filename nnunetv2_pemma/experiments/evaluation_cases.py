"""Which cases score a converted dataset's models: its labelled test cases when it has them, else fold 0's
validation cases.

Labelled test cases (imagesTs/ + labelsTs/, from `pemma phantom --labelled-test-cases-per-center` or HECKTOR's
released test labels) are in no cross-validation split, so no training and no checkpoint choice ever saw them.
HECKTOR's own training centres have none: there the tables fall back to fold 0's validation cases, as the paper
scored, and say so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nnunetv2_pemma.data.splits import SPLITS_FILE
from nnunetv2_pemma.errors import InputDataError

TEST, VALIDATION = "labelled test cases", "fold-0 validation cases"


@dataclass(frozen=True)
class EvaluationCases:
    """The scored cases of one raw dataset: their images ({case}_{channel:04d}.nii.gz) and labels."""

    kind: str  # TEST or VALIDATION
    cases: tuple[str, ...]
    images: Path
    labels: Path

    def describe(self) -> str:
        return f"{len(self.cases)} {self.kind}"


def evaluation_cases(raw_dataset: Path) -> EvaluationCases:
    """The labelled test cases of `raw_dataset` (every imagesTs case with a label in labelsTs), or, when it has
    none, fold 0's validation cases of its splits_final.json."""
    raw_dataset = Path(raw_dataset)
    labels = sorted(p.name[:-len(".nii.gz")] for p in (raw_dataset / "labelsTs").glob("*.nii.gz"))
    if labels:
        return EvaluationCases(TEST, tuple(labels), raw_dataset / "imagesTs", raw_dataset / "labelsTs")
    splits = raw_dataset / SPLITS_FILE
    if not splits.is_file():
        raise InputDataError(f"{raw_dataset} has neither labelled test cases (labelsTs/) nor {SPLITS_FILE}: nothing "
                             f"to score its models on")
    cases = tuple(sorted(json.loads(splits.read_text())[0]["val"]))
    return EvaluationCases(VALIDATION, cases, raw_dataset / "imagesTr", raw_dataset / "labelsTr")
