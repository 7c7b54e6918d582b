"""Segmentation metrics of a prediction folder against a reference folder, HECKTOR 2022 style (`pemma evaluate`).

Both folders hold one label image per case, named `<case id><file_ending>` (`.nii.gz`, as nnU-Net writes them);
other files (nnU-Net's `dataset.json`, `plans.json`, probability `.npz`, ...) are ignored. For every case and every
label (by default GTVp = 1 and GTVn = 2) we report:

* **Dice** `2|A∩B| / (|A|+|B|)` with A the predicted and B the reference voxels of the label. **NaN** (`null` in
  JSON) when the structure is absent from both prediction and reference (nothing to score; nnU-Net's own
  convention), **0** when exactly one side has it. The per-label **mean Dice** averages over the cases with a
  defined (non-NaN) Dice and reports how many those were (`n_dice`).
* **HD95** in mm: MONAI's `compute_hausdorff_distance(percentile=95)` on the voxel grid with the image spacing.
  MONAI's convention: surface voxels are the mask minus its face-connected erosion, distances are Euclidean between
  surface-voxel centres, and the symmetric HD95 is the larger of the two directed 95th percentiles
  (prediction->reference and reference->prediction; `torch.quantile`, linear interpolation). HECKTOR's script
  (medpy) pools both directions before taking the percentile, so values can differ slightly on irregular shapes.
  **NaN** when either side lacks the structure (a distance to nothing is undefined; HECKTOR skips such cases too);
  the per-label **mean HD95** averages over the cases where it is defined (`n_hd95`).
* **Precision** `|A∩B| / |A|` and **recall** `|A∩B| / |B|` (H2ASeg's Table 1 reports them beside Dice and HD95):
  NaN when the prediction (precision) or the reference (recall) lacks the structure; their means, like Dice's, are
  over the cases where they are defined (`n_precision`, `n_recall`).
* **Volumes** in ml (voxel count x voxel volume from the spacing / 1000), prediction and reference, plus the
  intersection in ml, so the aggregate can be recomputed from the JSON for any subset of cases (e.g. one centre).

and per label HECKTOR 2022's **aggregated Dice**, `DSCagg = 2 * sum_i |A_i ∩ B_i| / sum_i (|A_i| + |B_i|)` over all
cases. As in HECKTOR's evaluation, the sums are of physical volumes (ml), so cases with different voxel sizes weigh
by physical volume, and a case where both sides lack the structure adds 0 to numerator and denominator (it neither
helps nor hurts). DSCagg is NaN only when the structure is absent from every case on both sides.
`aggregated_dice_mean` is the mean of the per-label DSCagg (HECKTOR 2022's ranking score: mean of GTVp and GTVn),
taken over the labels whose DSCagg is defined.

Inputs are checked, not repaired: each prediction must lie on its reference's grid (size, spacing, origin, direction
within `nnunetv2_pemma.data.geometry`'s tolerances of 0.01 mm / 1e-4), both images may only hold 0 and the given
label values, and the two folders must hold the same cases. Anything else is an `InputDataError` naming the case
and what differs. `allow_missing=True` instead evaluates the cases present in both folders and lists the others in
the result (`missing_predictions`, `missing_references`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import SimpleITK as sitk
import torch
from tqdm import tqdm

from nnunetv2_pemma.data.geometry import geometry_mismatch, sitk_error_reason
from nnunetv2_pemma.errors import InputDataError

HECKTOR_LABELS: dict[str, int] = {"GTVp": 1, "GTVn": 2}
FILE_ENDING = ".nii.gz"
_MAX_LISTED = 10  # case ids named in one error message


@dataclass
class EvaluationResult:
    """Metrics of one prediction folder. NaN marks undefined values (written as `null` in JSON).

    per_case: one dict per case, sorted by case id: `{"case": id, <label name>: {"dice", "hd95_mm", "precision",
        "recall", "volume_pred_ml", "volume_gt_ml", "intersection_ml"}, ...}`.
    mean: per label `{"dice", "n_dice", "hd95_mm", "n_hd95", "precision", "n_precision", "recall", "n_recall"}`:
        means over the cases where the value is defined, and how many those were.
    aggregated_dice: per label HECKTOR DSCagg; aggregated_dice_mean: their mean (over defined labels).
    """

    labels: dict[str, int]
    per_case: list[dict[str, Any]]
    mean: dict[str, dict[str, float]]
    aggregated_dice: dict[str, float]
    aggregated_dice_mean: float
    pred_dir: str = ""
    gt_dir: str = ""
    missing_predictions: list[str] = field(default_factory=list)
    missing_references: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: NaN becomes None, numbers are plain floats/ints."""
        return _json_ready({
            "labels": self.labels, "pred_dir": self.pred_dir, "gt_dir": self.gt_dir,
            "n_cases": len(self.per_case), "aggregated_dice": self.aggregated_dice,
            "aggregated_dice_mean": self.aggregated_dice_mean, "mean": self.mean, "per_case": self.per_case,
            "missing_predictions": self.missing_predictions, "missing_references": self.missing_references,
        })

    def to_json(self, indent: int | None = 2) -> str:
        """Strict JSON (no NaN tokens: undefined values are `null`)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EvaluationResult":
        """Inverse of `to_dict` (None becomes NaN again)."""
        data = _from_json(data)
        return cls(labels={k: int(v) for k, v in data["labels"].items()}, per_case=list(data["per_case"]),
                   mean=dict(data["mean"]), aggregated_dice=dict(data["aggregated_dice"]),
                   aggregated_dice_mean=data["aggregated_dice_mean"], pred_dir=data.get("pred_dir", ""),
                   gt_dir=data.get("gt_dir", ""), missing_predictions=list(data.get("missing_predictions", [])),
                   missing_references=list(data.get("missing_references", [])))

    @classmethod
    def load(cls, path: Path) -> "EvaluationResult":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def write_json(self, path: Path) -> Path:
        """Write `to_json()` to `path` atomically (temporary sibling file, then rename)."""
        path = Path(path)
        if path.is_dir():
            raise InputDataError(f"{path}: is a folder; give the JSON file to write")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.to_json() + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def __str__(self) -> str:
        rows = [("label", "mean Dice (n)", "mean HD95 mm (n)", "DSCagg")]
        for name in self.labels:
            m = self.mean[name]
            rows.append((name, f"{_num(m['dice'], '.4f')} ({m['n_dice']})",
                         f"{_num(m['hd95_mm'], '.2f')} ({m['n_hd95']})", _num(self.aggregated_dice[name], ".4f")))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [f"Evaluated {len(self.per_case)} cases: predictions {self.pred_dir or '?'} against references "
                 f"{self.gt_dir or '?'}"]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.append(f"DSCagg mean ({', '.join(self.labels)}): {_num(self.aggregated_dice_mean, '.4f')}")
        for what, ids in (("without a prediction", self.missing_predictions),
                          ("without a reference", self.missing_references)):
            if ids:
                lines.append(f"Skipped {len(ids)} cases {what}: {_list(ids)}")
        lines.append("Dice is undefined (left out of the mean) where both sides lack the structure; HD95 where "
                     "either does.")
        return "\n".join(lines)


def evaluate_folders(pred_dir: Path, gt_dir: Path, labels: Mapping[str, int] | None = None,
                     json_out: Path | None = None, allow_missing: bool = False,
                     file_ending: str = FILE_ENDING) -> EvaluationResult:
    """Score every prediction in `pred_dir` against the same-named reference in `gt_dir` (see the module docstring
    for the metrics and their conventions) and optionally write the result to `json_out` (atomically).

    labels: name -> label value (default HECKTOR's `{"GTVp": 1, "GTVn": 2}`); images may only contain 0 and these.
    allow_missing: evaluate the cases present in both folders (the others are listed in the result) instead of
        failing when a prediction has no reference or a reference no prediction.
    Raises InputDataError naming the case(s) for missing/unreadable files, grid mismatches and unknown labels.
    """
    labels = _check_labels(HECKTOR_LABELS if labels is None else labels)
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    preds = _cases_in(pred_dir, "prediction", file_ending)
    refs = _cases_in(gt_dir, "reference", file_ending)
    no_ref = sorted(set(preds) - set(refs))
    no_pred = sorted(set(refs) - set(preds))
    if (no_ref or no_pred) and not allow_missing:
        problems = []
        if no_pred:
            problems.append(f"{len(no_pred)} reference cases have no prediction in {pred_dir}: {_list(no_pred)}")
        if no_ref:
            problems.append(f"{len(no_ref)} predicted cases have no reference in {gt_dir}: {_list(no_ref)}")
        raise InputDataError("; ".join(problems) + f" (expected file names <case id>{file_ending}; "
                             "allow_missing evaluates only the cases present in both)")
    cases = sorted(set(preds) & set(refs))
    if not cases:
        raise InputDataError(f"no case is present in both {pred_dir} and {gt_dir} (prediction cases: "
                             f"{_list(sorted(preds))}; reference cases: {_list(sorted(refs))})")

    per_case = [_evaluate_case(case, preds[case], refs[case], labels)
                for case in tqdm(cases, desc="evaluating", unit="case")]
    result = EvaluationResult(labels=dict(labels), per_case=per_case, mean=_means(per_case, labels),
                              aggregated_dice={}, aggregated_dice_mean=math.nan, pred_dir=str(pred_dir),
                              gt_dir=str(gt_dir), missing_predictions=no_pred, missing_references=no_ref)
    result.aggregated_dice = aggregated_dice(per_case, labels)
    defined = [v for v in result.aggregated_dice.values() if not math.isnan(v)]
    result.aggregated_dice_mean = float(np.mean(defined)) if defined else math.nan
    if json_out is not None:
        result.write_json(Path(json_out))
    return result


def aggregated_dice(per_case: list[dict[str, Any]], labels: Mapping[str, int]) -> dict[str, float]:
    """HECKTOR's DSCagg per label from per-case entries: 2 * sum(intersection) / sum(pred + reference volume), in
    ml; NaN when the denominator is 0 (structure absent everywhere)."""
    out = {}
    for name in labels:
        inter = sum(c[name]["intersection_ml"] for c in per_case)
        total = sum(c[name]["volume_pred_ml"] + c[name]["volume_gt_ml"] for c in per_case)
        out[name] = 2.0 * inter / total if total > 0 else math.nan
    return out


def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing_xyz: tuple[float, ...], label: int) -> dict[str, float]:
    """Metrics of one label for one case. Arrays in SimpleITK's (z, y, x) order, spacing in its (x, y, z) order."""
    a, b = pred == label, ref == label
    voxel_ml = float(np.prod(spacing_xyz)) / 1000.0
    n_a, n_b = int(np.count_nonzero(a)), int(np.count_nonzero(b))
    n_ab = int(np.count_nonzero(a & b))
    dice = 2.0 * n_ab / (n_a + n_b) if n_a + n_b > 0 else math.nan
    return {"dice": dice, "hd95_mm": hd95_mm(a, b, spacing_xyz) if n_a and n_b else math.nan,
            "precision": n_ab / n_a if n_a else math.nan, "recall": n_ab / n_b if n_b else math.nan,
            "volume_pred_ml": n_a * voxel_ml, "volume_gt_ml": n_b * voxel_ml, "intersection_ml": n_ab * voxel_ml}


def hd95_mm(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing_xyz: tuple[float, ...]) -> float:
    """Symmetric HD95 (mm) of two non-empty boolean masks in (z, y, x) order with MONAI's implementation."""
    union = pred_mask | ref_mask
    # MONAI crops to the union's bounding box itself; cropping first only saves the float copies of whole images.
    box = tuple(slice(int(idx.min()), int(idx.max()) + 1) for idx in np.nonzero(union))
    p = torch.from_numpy(np.ascontiguousarray(pred_mask[box]))[None, None]
    r = torch.from_numpy(np.ascontiguousarray(ref_mask[box]))[None, None]
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():  # MONAI 1.5-1.6 pass a deprecated argument to themselves
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        hd = compute_hausdorff_distance(p, r, include_background=True, percentile=95,
                                        spacing=[float(s) for s in reversed(spacing_xyz)])
    return float(hd.reshape(-1)[0])


def _evaluate_case(case: str, pred_file: Path, ref_file: Path, labels: Mapping[str, int]) -> dict[str, Any]:
    pred_img = _read(pred_file, case, "prediction")
    ref_img = _read(ref_file, case, "reference")
    mismatch = geometry_mismatch(pred_img, ref_img)
    if mismatch is not None:
        raise InputDataError(f"case {case}: the prediction {pred_file} is not on the reference's grid ({mismatch}, "
                             f"prediction != reference {ref_file}); predictions must be in the reference's "
                             "geometry (e.g. restored to the original CT grid)")
    allowed = [0, *labels.values()]
    pred = _labels_array(pred_img, pred_file, case, "prediction", allowed)
    ref = _labels_array(ref_img, ref_file, case, "reference", allowed)
    spacing = tuple(float(s) for s in ref_img.GetSpacing())
    return {"case": case, **{name: case_metrics(pred, ref, spacing, value) for name, value in labels.items()}}


def _read(path: Path, case: str, what: str) -> sitk.Image:
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise InputDataError(f"case {case}: cannot read the {what} {path}: {sitk_error_reason(e)}") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputDataError(f"case {case}: the {what} {path} has {image.GetNumberOfComponentsPerPixel()} "
                             "components per voxel; a label image has one")
    return image


def _labels_array(image: sitk.Image, path: Path, case: str, what: str, allowed: list[int]) -> np.ndarray:
    arr = sitk.GetArrayFromImage(image)
    bad = ~np.isin(arr, allowed)
    if bad.any():
        values = np.unique(arr[bad])
        shown = ", ".join(f"{v:g}" for v in values[:_MAX_LISTED]) + (", ..." if len(values) > _MAX_LISTED else "")
        raise InputDataError(f"case {case}: the {what} {path} holds label values {shown} ({int(bad.sum())} voxels) "
                             f"outside the known labels {sorted(allowed)}")
    return arr


def _cases_in(folder: Path, what: str, file_ending: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise InputDataError(f"{folder}: the {what} folder does not exist")
    cases = {p.name[: -len(file_ending)]: p for p in sorted(folder.iterdir())
             if p.name.endswith(file_ending) and len(p.name) > len(file_ending) and not p.name.startswith(".")}
    if not cases:
        raise InputDataError(f"{folder}: no {what} files (<case id>{file_ending}) in this folder")
    return cases


def _check_labels(labels: Mapping[str, int]) -> dict[str, int]:
    out = {}
    for name, value in labels.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise InputDataError(f"label {name!r}: value {value!r} is not a positive integer (0 is background)")
        out[str(name)] = int(value)
    if not out:
        raise InputDataError("no labels to evaluate")
    if len(set(out.values())) != len(out):
        raise InputDataError(f"labels {out}: two names share a value")
    return out


def _means(per_case: list[dict[str, Any]], labels: Mapping[str, int]) -> dict[str, dict[str, float]]:
    out = {}
    for name in labels:
        entry: dict[str, Any] = {}
        for key, n_key in (("dice", "n_dice"), ("hd95_mm", "n_hd95"), ("precision", "n_precision"),
                           ("recall", "n_recall")):
            values = [c[name][key] for c in per_case if not math.isnan(c[name][key])]
            entry[key] = float(np.mean(values)) if values else math.nan
            entry[n_key] = len(values)
        out[name] = entry
    return out


def _json_ready(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    return obj


def _from_json(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: (math.nan if v is None and k not in ("pred_dir", "gt_dir") else _from_json(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    return obj


def _num(value: float, fmt: str) -> str:
    return "n/a" if value is None or math.isnan(value) else format(value, fmt)


def _list(ids: list[str]) -> str:
    return ", ".join(ids[:_MAX_LISTED]) + (f", ... ({len(ids) - _MAX_LISTED} more)" if len(ids) > _MAX_LISTED else "")
