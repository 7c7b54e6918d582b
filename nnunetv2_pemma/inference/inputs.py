"""Checks on a prediction input folder, before nnU-Net's predictor writes anything into the output folder.

nnU-Net groups the files of a case by their `_XXXX` channel suffix and only notices a missing channel deep in
preprocessing ("input has 1 channels, expected 2"), naming no case, after it has written plans.json and
dataset.json into the output folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from nnunetv2_pemma.errors import InputDataError


def input_cases(input_dir: Path, modalities: Sequence[str], file_ending: str = ".nii.gz") -> list[str]:
    """The case ids of `input_dir`; InputDataError naming the first case whose channel files are not exactly
    `{case}_0000 ... {case}_{n-1}` for the n `modalities` (in channel order)."""
    from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder

    if not input_dir.is_dir():
        raise InputDataError(f"input folder {input_dir} does not exist")
    cases = [str(c) for c in get_identifiers_from_splitted_dataset_folder(str(input_dir), file_ending)]
    if not cases:
        raise InputDataError(f"{input_dir}: no CASE_0000{file_ending} files (nnU-Net naming: one file per channel)")
    for case in cases:
        present = sorted(int(p.name[len(case) + 1:len(case) + 5]) for p in input_dir.glob(f"{case}_*{file_ending}")
                         if p.name[len(case) + 1:len(case) + 5].isdigit()
                         and len(p.name) == len(case) + 5 + len(file_ending))
        expected = list(range(len(modalities)))
        if present == expected:
            continue
        names = ", ".join(modalities)
        missing = [c for c in expected if c not in present]
        if missing:
            absent = ", ".join(f"{case}_{c:04d}{file_ending} ({modalities[c]})" for c in missing)
            have = [modalities[c] for c in present if c < len(modalities)]
            hint = (f"; to predict from the files present, pass --modalities {' '.join(have)}"
                    if have and present == list(range(len(have))) else "")
            raise InputDataError(f"case {case} in {input_dir}: no {absent}; the model takes {names} as "
                                 f"_0000..._{len(modalities) - 1:04d}{hint}")
        extra = ", ".join(f"{case}_{c:04d}{file_ending}" for c in present if c >= len(modalities))
        raise InputDataError(f"case {case} in {input_dir}: {extra} beyond the {len(modalities)} channel(s) "
                             f"{names} the model takes (--modalities says which modalities the files hold)")
    return cases


def refuse_existing_predictions(output_dir: Path, cases: Sequence[str], overwrite: bool,
                                file_ending: str = ".nii.gz") -> None:
    """Predictions already in `output_dir` for any of `cases` are only replaced when the user asks."""
    done = [c for c in cases if (output_dir / f"{c}{file_ending}").exists()]
    if done and not overwrite:
        raise InputDataError(f"{output_dir} already holds predictions of {len(done)} of the {len(cases)} input cases "
                             f"({', '.join(done[:3])}{', ...' if len(done) > 3 else ''}); pass --overwrite to "
                             f"replace them")
