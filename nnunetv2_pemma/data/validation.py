"""Per-case checks, run on every case before anything is written.

Each check reads the case's files and returns the list of problems found (empty when the case is fine) together
with its crop record, so that the conversion either writes every selected case or nothing at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import nibabel as nib
from nibabel.filebasedimages import ImageFileError
import numpy as np
import SimpleITK as sitk

from nnunetv2_pemma.data.centers import center_of
from nnunetv2_pemma.data.geometry import (Box, bbox_mm_box, crop_record, geometry_mismatch, headneck_box,
                                          overlap_problem, sitk_error_reason)
from nnunetv2_pemma.errors import InputDataError

_FLOAT_PIXELS = (sitk.sitkFloat32, sitk.sitkFloat64)


@dataclass(frozen=True)
class CaseFiles:
    """Where one HECKTOR case's files are (or would be, when missing) and what discovery already found wrong.

    The CT is always needed, even for the PET-only variant: its grid is the output grid (labels are drawn on it,
    PET is resampled onto it and the head-and-neck box is found on it).
    """

    case_id: str
    split: str  # "train" (imagesTr + label) or "test" (imagesTs, no label)
    root: Path  # the input folder, to keep messages short
    ct: Path
    pet: Path
    label: Path | None
    bbox_mm: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # HECKTOR 2021 crop box (lo, hi)
    problems: tuple[str, ...] = field(default=())

    @property
    def center(self) -> str:
        return center_of(self.case_id)

    def show(self, path: Path) -> str:
        """A path relative to the input folder, for messages."""
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)


@dataclass(frozen=True)
class CaseCheck:
    problems: list[str]
    record: dict | None  # crop record; None when the case is bad


def check_case(case: CaseFiles, modalities: Sequence[str], allowed_labels: Sequence[int], crop: str,
               crop_size_mm: Sequence[float]) -> CaseCheck:
    """Read every file the conversion will use and say what is wrong with them."""
    if case.problems:  # duplicate ids, unknown centre...: the files are ambiguous, reading them tells nothing more
        return CaseCheck(list(case.problems), None)
    problems: list[str] = []
    ct = _read(case, case.ct, "CT", problems)
    pet = _read(case, case.pet, "PET", problems) if "PET" in modalities else None
    label = _read(case, case.label, "label", problems) if case.label is not None else None
    if label is not None:
        problems += _label_problems(case, label, allowed_labels)
        if ct is not None:
            mismatch = geometry_mismatch(label, ct)
            if mismatch is not None:
                problems.append(f"label file {case.show(case.label)} is not on its CT's grid: {mismatch}")
    record = None
    if ct is not None:
        try:
            box = _box(case, ct, crop, crop_size_mm)
        except InputDataError as e:
            problems.append(f"CT file {case.show(case.ct)}: {e}")
        else:
            if pet is not None and (overlap := overlap_problem(pet, ct, box)) is not None:
                problems.append(f"PET file {case.show(case.pet)} {overlap}")
            record = crop_record(ct, box, case.split)
    return CaseCheck(problems, record if not problems else None)


def _read(case: CaseFiles, path: Path, what: str, problems: list[str]) -> sitk.Image | None:
    """A readable 3-D scalar image with finite voxels, or None with the reason appended to `problems`."""
    shown = case.show(path)
    if not path.is_file():
        problems.append(f"missing {what} file {shown}")
        return None
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        problems.append(f"cannot read {what} file {shown}: {sitk_error_reason(e)}")
        return None
    if image.GetDimension() != 3:
        problems.append(f"{what} file {shown} is {image.GetDimension()}-D {image.GetSize()}, expected a 3-D image")
        return None
    if image.GetNumberOfComponentsPerPixel() != 1:
        problems.append(f"{what} file {shown} has {image.GetNumberOfComponentsPerPixel()} components per voxel, "
                        f"expected 1")
        return None
    try:
        n_bad = _count_non_finite(path, image)
    except (ImageFileError, OSError, EOFError, ValueError) as e:
        problems.append(f"cannot read {what} file {shown}: {e}")
        return None
    if n_bad:
        problems.append(f"{what} file {shown} has {n_bad} NaN/inf voxels")
        return None
    return image


def _count_non_finite(path: Path, image: sitk.Image) -> int:
    """NaN/inf voxels of a float image, counted in the file: SimpleITK's NIfTI reader (ITK < 6) silently turns them
    into 0, which would hide them from us and from nnU-Net's own integrity check."""
    if image.GetPixelID() not in _FLOAT_PIXELS:
        return 0
    if path.name.lower().endswith((".nii", ".nii.gz")):
        data = np.asanyarray(nib.load(str(path)).dataobj)
    else:
        data = sitk.GetArrayViewFromImage(image)
    return int(data.size - np.count_nonzero(np.isfinite(data)))


def _label_problems(case: CaseFiles, label: sitk.Image, allowed: Sequence[int]) -> list[str]:
    array = sitk.GetArrayViewFromImage(label)
    outside = np.unique(array[~np.isin(array, allowed)])
    if outside.size == 0:
        return []
    shown = ", ".join(f"{v:g}" for v in outside[:10].tolist()) + (", ..." if outside.size > 10 else "")
    return [f"label file {case.show(case.label)} has values {{{shown}}} outside "
            f"{{{', '.join(str(v) for v in allowed)}}}"]


def _box(case: CaseFiles, ct: sitk.Image, crop: str, crop_size_mm: Sequence[float]) -> Box:
    if crop == "none":
        return [0, 0, 0], list(ct.GetSize())
    if case.bbox_mm is not None:
        return bbox_mm_box(ct, *case.bbox_mm)
    return headneck_box(ct, crop_size_mm)
