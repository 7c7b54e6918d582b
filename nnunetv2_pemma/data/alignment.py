"""`pemma check-alignment`: which cases of a HECKTOR folder have PET and CT out of register, before converting.

Nothing is written into the dataset: each readable case's PET is registered to its CT region (as
`convert-hecktor --register rigid` would) only to estimate how far apart they are. A case is flagged when the
registration clearly beats the header geometry (`Registration.applied`) and moves the CT body's centre by more than
`tolerance_mm` or rotates by more than `tolerance_deg`.
"""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

import SimpleITK as sitk

from nnunetv2_pemma.data.geometry import crop as crop_to
from nnunetv2_pemma.data.hecktor import discover
from nnunetv2_pemma.data.registration import RegistrationFailed, RegistrationLimits, register_pet_to_ct
from nnunetv2_pemma.data.validation import check_case
from nnunetv2_pemma.errors import InputDataError

COLUMNS = ("case", "status", "shift_mm", "rotation_deg", "mi_gain", "seconds", "detail")


@dataclass(frozen=True)
class AlignmentRow:
    case: str
    status: str  # "aligned", "MISALIGNED", "bad" (unreadable or unregistrable: `detail` says why)
    shift_mm: float | None = None
    rotation_deg: float | None = None
    mi_gain: float | None = None
    seconds: float | None = None
    detail: str = ""


def check_alignment(input_dir: Path, edition: int = 2022, centers: Sequence[str] | None = None,
                    crop: str = "headneck", crop_size_mm: Sequence[float] = (200.0, 200.0, 310.0),
                    tolerance_mm: float = 4.0, tolerance_deg: float = 2.0,
                    limits: RegistrationLimits = RegistrationLimits()) -> list[AlignmentRow]:
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
        try:
            result = register_pet_to_ct(ct, sitk.ReadImage(str(case.pet)), limits)
        except RegistrationFailed as e:
            rows.append(AlignmentRow(case.case_id, "bad", detail=f"PET cannot be registered to its CT: {e}"))
            continue
        flagged = result.applied and (result.shift_mm > tolerance_mm or result.rotation_deg > tolerance_deg)
        rows.append(AlignmentRow(case.case_id, "MISALIGNED" if flagged else "aligned", result.shift_mm,
                                 result.rotation_deg, result.gain, result.seconds,
                                 result.problem(limits) or ""))
    return rows


def format_rows(rows: list[AlignmentRow], tolerance_mm: float, tolerance_deg: float) -> str:
    """The table the CLI prints, with a closing summary line."""
    lines = [f"{'case':<12} {'status':<11} {'shift mm':>8} {'rot deg':>7} {'MI gain':>7}  detail"]
    for row in rows:
        numbers = (f"{row.shift_mm:8.1f} {row.rotation_deg:7.1f} {row.mi_gain:7.3f}" if row.shift_mm is not None
                   else f"{'-':>8} {'-':>7} {'-':>7}")
        lines.append(f"{row.case:<12} {row.status:<11} {numbers}  {row.detail}")
    flagged = [r.case for r in rows if r.status == "MISALIGNED"]
    bad = [r.case for r in rows if r.status == "bad"]
    lines.append(f"{len(flagged)} of {len(rows)} case(s) misaligned beyond {tolerance_mm:g} mm or {tolerance_deg:g} "
                 f"degrees" + (f" ({', '.join(flagged)}): convert with --register rigid" if flagged else "")
                 + (f"; {len(bad)} bad case(s) not checked" if bad else ""))
    return "\n".join(lines)


def write_csv(rows: list[AlignmentRow], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([getattr(row, c) if getattr(row, c) is not None else "" for c in COLUMNS])
