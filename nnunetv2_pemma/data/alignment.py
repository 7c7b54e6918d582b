"""`pemma check-alignment`: which cases of a HECKTOR folder have PET and CT out of register, before converting.

Nothing is written. Each readable case gets two figures:
- the registration-free body-outline distance (`outline`): quick, blind to motion along the neck's axis;
- the motion the rigid registration of `convert-hecktor --register rigid` finds, estimated only.
A case is flagged when the registration clearly beats the header geometry (`Registration.applied`) and moves the CT
body's centre by more than `tolerance_mm` or rotates by more than `tolerance_deg`; with `quick`, no registration
runs and a case is flagged when its outlines lie more than OUTLINE_WARN_MM apart.
"""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import SimpleITK as sitk
from tqdm import tqdm

from nnunetv2_pemma.data.geometry import crop as crop_to
from nnunetv2_pemma.data.geometry import resample_pet_to
from nnunetv2_pemma.data.hecktor import discover
from nnunetv2_pemma.data.outline import OUTLINE_WARN_MM, outline_distance_mm
from nnunetv2_pemma.data.registration import RegistrationFailed, RegistrationLimits, register_pet_to_ct
from nnunetv2_pemma.data.validation import check_case
from nnunetv2_pemma.errors import InputDataError

COLUMNS = ("case", "status", "outline_mm", "shift_mm", "rotation_deg", "mi_gain", "seconds", "detail")


@dataclass(frozen=True)
class AlignmentRow:
    case: str
    status: str  # "aligned", "MISALIGNED", "bad" (unreadable or unregistrable: `detail` says why)
    outline_mm: float | None = None
    shift_mm: float | None = None
    rotation_deg: float | None = None
    mi_gain: float | None = None
    seconds: float | None = None
    detail: str = ""


def check_alignment(input_dir: Path, edition: int = 2022, centers: Sequence[str] | None = None,
                    crop: str = "headneck", crop_size_mm: Sequence[float] = (200.0, 200.0, 310.0),
                    tolerance_mm: float = 4.0, tolerance_deg: float = 2.0,
                    limits: RegistrationLimits = RegistrationLimits(), quick: bool = False) -> list[AlignmentRow]:
    """One row per case: its estimated misalignment and whether it is flagged (`limits` bounds the search, as in
    the conversion; a case beyond them is reported, not refused)."""
    input_dir = Path(input_dir)
    if not tolerance_mm > 0 or not tolerance_deg > 0:
        raise InputDataError(f"tolerances must be positive, got {tolerance_mm:g} mm and {tolerance_deg:g} degrees")
    if edition not in (2021, 2022):
        raise InputDataError(f"edition must be 2022 or 2021, got {edition}")
    cases, _ = discover(input_dir, edition, crop, centers)
    rows = []
    for case in tqdm(cases, desc="checking alignment", unit="case"):
        check = check_case(dataclasses.replace(case, label=None), ["CT", "PET"], [], crop, crop_size_mm)
        if check.problems:
            rows.append(AlignmentRow(case.case_id, "bad", detail="; ".join(check.problems)))
            continue
        ct = crop_to(sitk.ReadImage(str(case.ct)), check.record)
        pet = sitk.ReadImage(str(case.pet))
        outline = outline_distance_mm(ct, resample_pet_to(pet, ct))
        if quick:
            flagged = outline is not None and outline > OUTLINE_WARN_MM
            rows.append(AlignmentRow(case.case_id, "MISALIGNED" if flagged else "aligned", outline,
                                     detail="" if outline is not None else "no body outline in the CT or PET"))
            continue
        try:
            result = register_pet_to_ct(ct, pet, limits)
        except RegistrationFailed as e:
            rows.append(AlignmentRow(case.case_id, "bad", outline, detail=f"PET cannot be registered to its CT: {e}"))
            continue
        flagged = result.applied and (result.shift_mm > tolerance_mm or result.rotation_deg > tolerance_deg)
        rows.append(AlignmentRow(case.case_id, "MISALIGNED" if flagged else "aligned", outline, result.shift_mm,
                                 result.rotation_deg, result.gain, result.seconds, result.problem(limits) or ""))
    return rows


def format_rows(rows: list[AlignmentRow], tolerance_mm: float, tolerance_deg: float, quick: bool = False) -> str:
    """The table the CLI prints, with a closing summary line."""
    def number(value: float | None, width: int, digits: int) -> str:
        return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}}"

    lines = [f"{'case':<12} {'status':<11} {'outline mm':>10} {'shift mm':>8} {'rot deg':>7} {'MI gain':>7}  detail"]
    for r in rows:
        lines.append(f"{r.case:<12} {r.status:<11} {number(r.outline_mm, 10, 1)} {number(r.shift_mm, 8, 1)} "
                     f"{number(r.rotation_deg, 7, 1)} {number(r.mi_gain, 7, 3)}  {r.detail}".rstrip())
    flagged = [r.case for r in rows if r.status == "MISALIGNED"]
    bad = [r.case for r in rows if r.status == "bad"]
    criterion = (f"with body outlines more than {OUTLINE_WARN_MM:g} mm apart (quick screen, no registration)" if quick
                 else f"misaligned beyond {tolerance_mm:g} mm or {tolerance_deg:g} degrees")
    lines.append(f"{len(flagged)} of {len(rows)} case(s) {criterion}"
                 + (f" ({', '.join(flagged)}): convert with --register rigid" if flagged else "")
                 + (f"; {len(bad)} bad case(s) not checked" if bad else ""))
    return "\n".join(lines)


def write_csv(rows: list[AlignmentRow], path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            for row in rows:
                writer.writerow([getattr(row, c) if getattr(row, c) is not None else "" for c in COLUMNS])
    except OSError as e:
        raise InputDataError(f"cannot write the alignment table {path}: {e.strerror}") from None
