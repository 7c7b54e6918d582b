"""Per-case checks, run on every case before anything is written.

Each check reads the case's files and returns the problems found (empty when the case is fine), the warnings to show
if it is converted, and its crop record, so that the conversion either writes every selected case or nothing at all.

Every file is decoded whole twice, by SimpleITK (what the conversion and nnU-Net read with) and by nibabel, and the
two must agree: SimpleITK fills a truncated .nii.gz with zeros and turns NaN into 0 without an error, and reads some
broken headers as another grid (see `geometry.nifti_header_problem`).
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import nibabel as nib
from nibabel.arrayproxy import ArrayProxy
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
import numpy as np
import SimpleITK as sitk

from nnunetv2_pemma.data.centers import center_of
from nnunetv2_pemma.data.geometry import (Box, bbox_mm_box, crop_record, geometry_mismatch, headneck_box,
                                          nifti_header_problem, overlap_problem, resample_pet_to, sitk_error_reason)
from nnunetv2_pemma.data.geometry import crop as crop_to
from nnunetv2_pemma.data.outline import OUTLINE_WARN_MM, outline_distance_mm
from nnunetv2_pemma.errors import InputDataError

_DECODE_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, ValueError, zlib.error)
_HEADER_CLASSES = (nib.Nifti1Header, nib.Nifti2Header)
_SLAB_VOXELS = 1 << 22  # voxels compared at a time, so that a 512x512x300 CT needs no full-size temporaries


@dataclass(frozen=True)
class CaseFiles:
    """Where one HECKTOR case's files are (or would be, when missing) and what discovery already found wrong.

    The CT is always needed, even for the PET-only variant: its grid is the output grid (labels are drawn on it,
    PET is resampled onto it and the head-and-neck box is found on it).
    """

    case_id: str
    split: str  # "train" (imagesTr + labelsTr) or "test" (imagesTs, with a label in labelsTs or none)
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
    warnings: list[str] = field(default_factory=list)  # suspicious but convertible (only looked for in good cases)


@dataclass(frozen=True)
class _Nifti:
    """A NIfTI file as nibabel decodes it."""

    header: nib.Nifti1Header  # as nibabel loads it (repaired where it can)
    written_pixdim: tuple[float, ...]  # the three spatial voxel sizes as stored, before nibabel's repairs
    stored: np.ndarray  # voxel values before scl_slope/scl_inter, in the file's (x, y, z) order


def check_case(case: CaseFiles, modalities: Sequence[str], allowed_labels: Sequence[int], crop: str,
               crop_size_mm: Sequence[float], screen_alignment: bool = False) -> CaseCheck:
    """Read every file the conversion will use and say what is wrong with them; with `screen_alignment`, also warn
    when the PET and CT body outlines lie further apart than registered cases' do (see `outline`)."""
    if case.problems:  # duplicate ids, unknown centre...: the files are ambiguous, reading them tells nothing more
        return CaseCheck(list(case.problems), None)
    problems: list[str] = []
    with _quiet_readers():
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
    if problems:
        return CaseCheck(problems, None)
    warnings = _suspicious(case, ct, pet)  # no problems: the CT was read
    if screen_alignment and pet is not None:
        warnings += _outline_warning(case, crop_to(ct, record), pet)
    return CaseCheck(problems, record, warnings)


def _outline_warning(case: CaseFiles, ct: sitk.Image, pet: sitk.Image) -> list[str]:
    """A warning when PET and CT look misaligned by their body outlines."""
    distance = outline_distance_mm(ct, resample_pet_to(pet, ct))
    if distance is None or distance <= OUTLINE_WARN_MM:
        return []
    return [f"{case.case_id}: PET and CT body outlines are {distance:.1f} mm apart on average (registered cases: "
            f"under {OUTLINE_WARN_MM:g} mm); they may be misaligned: check with `pemma check-alignment` or convert "
            f"with --register rigid"]


def _read(case: CaseFiles, path: Path, what: str, problems: list[str]) -> sitk.Image | None:
    """A 3-D scalar image that SimpleITK and nibabel decode alike, with finite voxels and a header grid that can be
    trusted, or None with the reason appended to `problems`."""
    shown = case.show(path)
    if not path.is_file():
        problems.append(f"missing {what} file {shown}")
        return None
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        problems.append(f"cannot read {what} file {shown}: {sitk_error_reason(e).replace(str(path), shown)}")
        return None
    if image.GetDimension() != 3:
        problems.append(f"{what} file {shown} is {image.GetDimension()}-D {image.GetSize()}, expected a 3-D image")
        return None
    if image.GetNumberOfComponentsPerPixel() != 1:
        problems.append(f"{what} file {shown} has {image.GetNumberOfComponentsPerPixel()} components per voxel, "
                        f"expected 1")
        return None
    try:
        nifti = _decode(path)
    except _DECODE_ERRORS as e:
        reason = " ".join(str(e).replace(str(path), shown).split())
        problems.append(f"{what} file {shown} is truncated or corrupt: nibabel cannot decode it "
                        f"({type(e).__name__}: {reason})")
        return None
    problem = _voxel_problem(nifti, image) or nifti_header_problem(nifti.written_pixdim, nifti.header,
                                                                   image.GetDirection())
    if problem is not None:
        problems.append(f"{what} file {shown} {problem}")
        return None
    return image


@contextlib.contextmanager
def _quiet_readers() -> Iterator[None]:
    """ITK and nibabel print what they make of odd headers on stderr (ITK in several lines); the checks here report
    such files themselves, in one line."""
    itk_shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    nibabel_logger: logging.Logger = nib.imageglobals.logger
    nibabel_disabled = nibabel_logger.disabled
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    nibabel_logger.disabled = True
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(itk_shown)
        nibabel_logger.disabled = nibabel_disabled


def _decode(path: Path) -> _Nifti:
    """Decode the whole file with nibabel, once; a .nii.gz is read to its end, where gzip checks its CRC and length
    (nibabel alone stops after the voxels, so a corrupt but inflatable stream would pass)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        block = f.read(max(k.template_dtype.itemsize for k in _HEADER_CLASSES))
        klass = next((k for k in _HEADER_CLASSES if k.may_contain_header(block)), None)
        if klass is None:
            raise ImageFileError("no NIfTI-1 or NIfTI-2 header")
        block = block[:klass.template_dtype.itemsize]
        written = klass(block, check=False)
        header = klass(block)  # nibabel's own checks: repairs what it can, raises on what it cannot
        stored = ArrayProxy(f, header, mmap=False).get_unscaled()
        while f.read(1 << 24):
            pass
    return _Nifti(header, tuple(float(v) for v in written["pixdim"][1:4]), stored)


def _voxel_problem(nifti: _Nifti, image: sitk.Image) -> str | None:
    """NaN/inf voxels (SimpleITK reads them as 0), or voxels that SimpleITK reads otherwise than nibabel (damaged
    data one of them tolerates, or a header they read differently, such as scl_slope 0 with an scl_inter); compared
    slab by slab to bound the memory."""
    shape = tuple(int(n) for n in nifti.stored.shape[:3])
    if len(nifti.stored.shape) < 3 or any(n != 1 for n in nifti.stored.shape[3:]) or shape != image.GetSize():
        return (f"is corrupt or ambiguous: SimpleITK reads {_dims(image.GetSize())} voxels, "
                f"nibabel {_dims(nifti.stored.shape)}")
    slope, inter = (d if v is None else float(v) for v, d in zip(nifti.header.get_slope_inter(), (1.0, 0.0)))
    ours = nifti.stored.reshape(shape, order="F").T  # (z, y, x) like SimpleITK's arrays; a view, no copy
    theirs = sitk.GetArrayViewFromImage(image)
    step = max(1, _SLAB_VOXELS // (shape[0] * shape[1]))
    non_finite = differing = 0
    first = ""
    for z in range(0, shape[2], step):
        a = ours[z:z + step] if (slope, inter) == (1.0, 0.0) else ours[z:z + step] * slope + inter
        b = theirs[z:z + step]
        mask, n_bad = _differing(a, b, inter)
        non_finite += n_bad
        n = int(np.count_nonzero(mask))
        if n and not first:
            k, j, i = np.unravel_index(int(np.argmax(mask)), mask.shape)
            first = f"first at voxel ({i}, {j}, {z + k}): SimpleITK {b[k, j, i]}, nibabel {a[k, j, i]}"
        differing += n
    if non_finite:
        return f"has {non_finite} NaN/inf voxels"
    if differing:
        return (f"is corrupt or ambiguous: SimpleITK and nibabel read {differing} of {int(np.prod(shape))} voxels "
                f"differently ({first})")
    return None


def _differing(a: np.ndarray, b: np.ndarray, inter: float) -> tuple[np.ndarray, int]:
    """Where SimpleITK's `b` differs from nibabel's `a`: exactly for integer images, within float rounding of the
    scaling for float ones; NaN/inf in `a` are counted apart (SimpleITK has 0 there)."""
    if b.dtype.kind != "f":
        return a != b, 0
    finite = np.isfinite(a)
    tolerance = 4 * np.finfo(b.dtype).eps * (np.abs(a) + abs(inter))
    return finite & ~(np.abs(a - b) <= tolerance), int(a.size - np.count_nonzero(finite))


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(n) for n in shape)


def _suspicious(case: CaseFiles, ct: sitk.Image, pet: sitk.Image | None) -> list[str]:
    """Convertible, but probably not what was meant: a PET with no signal, a CT of a single value."""
    found = []
    if pet is not None and not np.any(sitk.GetArrayViewFromImage(pet)):
        found.append(f"{case.case_id}: PET file {case.show(case.pet)} is all zero (no uptake anywhere)")
    values = sitk.GetArrayViewFromImage(ct)
    if values.min() == values.max():
        found.append(f"{case.case_id}: CT file {case.show(case.ct)} has the same value ({values.flat[0]}) in every "
                     f"voxel")
    return found


def _label_problems(case: CaseFiles, label: sitk.Image, allowed: Sequence[int]) -> list[str]:
    array = sitk.GetArrayViewFromImage(label)
    outside = np.unique(array[~np.isin(array, allowed)])
    if outside.size == 0:
        return []
    shown = ", ".join(_exact(v) for v in outside[:10]) + (", ..." if outside.size > 10 else "")
    return [f"label file {case.show(case.label)} has values {{{shown}}} outside "
            f"{{{', '.join(str(v) for v in allowed)}}}"]


def _exact(value: np.generic) -> str:
    """A whole number as such, anything else in numpy's shortest repr for its dtype (1.0000001 must not show as 1)."""
    if np.issubdtype(value.dtype, np.integer) or not value.is_integer():
        return str(value)
    return str(int(value))


def _box(case: CaseFiles, ct: sitk.Image, crop: str, crop_size_mm: Sequence[float]) -> Box:
    if crop == "none":
        return [0, 0, 0], list(ct.GetSize())
    if case.bbox_mm is not None:
        return bbox_mm_box(ct, *case.bbox_mm)
    return headneck_box(ct, crop_size_mm)
