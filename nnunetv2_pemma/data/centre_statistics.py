"""HU and SUV statistics per centre of a HECKTOR 2022 folder: what makes one centre's images unlike another's.

Measured on the written files, per labelled case (training cases in imagesTr/labelsTr, labelled test cases in
imagesTs/labelsTs), then the median per centre:

- `gtvp_hu`: mean CT HU inside the GTVp (SimpleITK's label statistics);
- `enhancing_pct`: share of the CT body's soft tissue (> -500 HU, over 3 voxels from bone > 400 HU) between 120
  and 400 HU, where iodine-enhanced vessels and lesion rims lie and unenhanced soft tissue does not;
- `ct_noise_hu`: CT noise seen at voxel scale: the robust standard deviation (1.4826 x median absolute deviation)
  of neighbouring voxels' differences along x inside the body, over sqrt(2); a sharp kernel raises it;
- `pet_body_suv`: median SUV inside the CT body (PET resampled onto the CT grid): the SUV calibration;
- `pet_gtvp_suv_max`: SUVmax inside the GTVp, lower with a coarser PET resolution for the same uptake.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from tqdm import tqdm

from nnunetv2_pemma.data.centers import LABELS_2022, center_of
from nnunetv2_pemma.errors import InputDataError

COLUMNS = ("gtvp_hu", "enhancing_pct", "ct_noise_hu", "pet_body_suv", "pet_gtvp_suv_max")
BODY_HU = -500.0
ENHANCING_HU = (120.0, 400.0)
BONE_HU, BONE_MARGIN_VOXELS = 400.0, 3  # partial-volume bone edges also fall between 120 and 400 HU


def case_statistics(ct: sitk.Image, pet: sitk.Image, label: sitk.Image) -> dict[str, float]:
    """The COLUMNS of one case (CT in HU, PET in SUV on any grid, label on the CT grid)."""
    pet_on_ct = sitk.Resample(pet, ct, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    ct_stats, pet_stats = sitk.LabelStatisticsImageFilter(), sitk.LabelStatisticsImageFilter()
    ct_stats.Execute(sitk.Cast(ct, sitk.sitkFloat32), label)
    pet_stats.Execute(pet_on_ct, label)
    gtvp = LABELS_2022["GTVp"]
    has_gtvp = ct_stats.HasLabel(gtvp)
    hu = sitk.GetArrayViewFromImage(ct).astype(np.float64)
    body = hu > BODY_HU
    lo, hi = ENHANCING_HU
    near_bone = sitk.GetArrayViewFromImage(sitk.BinaryDilate(ct > BONE_HU, [BONE_MARGIN_VOXELS] * 3)).astype(bool)
    soft = body & ~near_bone
    steps = np.diff(hu, axis=2)[body[:, :, 1:] & body[:, :, :-1]]
    noise = 1.4826 * float(np.median(np.abs(steps - np.median(steps)))) / math.sqrt(2.0)
    return {"gtvp_hu": ct_stats.GetMean(gtvp) if has_gtvp else math.nan,
            "enhancing_pct": 100.0 * float(((hu >= lo) & (hu <= hi) & soft).sum()) / max(int(soft.sum()), 1),
            "ct_noise_hu": noise,
            "pet_body_suv": float(np.median(sitk.GetArrayViewFromImage(pet_on_ct)[body])),
            "pet_gtvp_suv_max": pet_stats.GetMaximum(gtvp) if has_gtvp else math.nan}


def _labelled_cases(root: Path) -> list[tuple[str, Path, Path, Path]]:
    cases = []
    for images, labels in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        for label in sorted((root / labels).glob("*.nii.gz")) if (root / labels).is_dir() else []:
            case = label.name[:-len(".nii.gz")]
            cases.append((case, root / images / f"{case}__CT.nii.gz", root / images / f"{case}__PT.nii.gz", label))
    return cases


def centre_statistics(root: Path) -> pd.DataFrame:
    """Per centre (rows, in the folder's order) the median of each COLUMN over its labelled cases, and `cases`."""
    root = Path(root)
    cases = _labelled_cases(root)
    if not cases:
        raise InputDataError(f"{root} has no labelled cases (labelsTr/ or labelsTs/ with images beside them)")
    rows = []
    for case, ct, pet, label in tqdm(cases, desc="centre statistics", unit="case"):
        missing = [p for p in (ct, pet) if not p.is_file()]
        if missing:
            raise InputDataError(f"case {case}: missing {missing[0]}")
        rows.append({"centre": center_of(case), **case_statistics(
            sitk.ReadImage(str(ct)), sitk.ReadImage(str(pet)), sitk.ReadImage(str(label), sitk.sitkUInt8))})
    table = pd.DataFrame(rows)
    out = table.groupby("centre", sort=False)[list(COLUMNS)].median()
    out["cases"] = table.groupby("centre", sort=False).size()
    return out
