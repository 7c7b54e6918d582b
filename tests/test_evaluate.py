"""`evaluate_folders` on real NIfTI files: every expected value is worked out by hand from boxes of known size.

The grid is 1 x 1 x 2 mm (x, y, z), so a voxel is 2 mm^3 = 0.002 ml, and a wrong spacing order (SimpleITK's
(x, y, z) against numpy's (z, y, x)) changes the distances and volumes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_pemma.errors import InputDataError
from nnunetv2_pemma.evaluation.metrics import EvaluationResult, evaluate_folders

SPACING = (1.0, 1.0, 2.0)  # x, y, z mm
SIZE = (16, 12, 10)  # x, y, z voxels
ORIGIN = (-7.5, 3.0, 11.0)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
VOXEL_ML = 1.0 * 1.0 * 2.0 / 1000.0
GTVP, GTVN = 1, 2


def blank(size=SIZE) -> np.ndarray:
    return np.zeros(size[::-1], dtype=np.uint8)  # numpy (z, y, x)


def paint(arr: np.ndarray, label: int, x: tuple[int, int], y: tuple[int, int], z: tuple[int, int]) -> np.ndarray:
    """Fill the box [x0, x1) x [y0, y1) x [z0, z1) (voxel indices) with `label`."""
    arr[z[0]:z[1], y[0]:y[1], x[0]:x[1]] = label
    return arr


def write(folder: Path, case: str, arr: np.ndarray, spacing=SPACING, origin=ORIGIN, direction=IDENTITY) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    path = folder / f"{case}.nii.gz"
    sitk.WriteImage(img, str(path))
    return path


def evaluate(tmp_path: Path, cases: dict[str, tuple[np.ndarray, np.ndarray]], **kwargs) -> EvaluationResult:
    """Write {case: (prediction, reference)} and evaluate them."""
    for case, (pred, ref) in cases.items():
        write(tmp_path / "pred", case, pred)
        write(tmp_path / "gt", case, ref)
    return evaluate_folders(tmp_path / "pred", tmp_path / "gt", **kwargs)


def case_entry(result: EvaluationResult, case: str) -> dict:
    (entry,) = [c for c in result.per_case if c["case"] == case]
    return entry


def test_dice_and_volumes_of_two_overlapping_boxes(tmp_path: Path) -> None:
    pred = paint(blank(), GTVP, x=(2, 6), y=(2, 5), z=(1, 3))  # 4 * 3 * 2 = 24 voxels
    ref = paint(blank(), GTVP, x=(4, 8), y=(2, 5), z=(1, 4))  # 4 * 3 * 3 = 36 voxels
    overlap = 2 * 3 * 2  # x 4..5, y 2..4, z 1..2
    paint(pred, GTVN, x=(10, 13), y=(6, 9), z=(5, 8))  # identical GTVn: 27 voxels
    paint(ref, GTVN, x=(10, 13), y=(6, 9), z=(5, 8))
    result = evaluate(tmp_path, {"CHUM-001": (pred, ref)})

    gtvp = case_entry(result, "CHUM-001")["GTVp"]
    assert gtvp["dice"] == pytest.approx(2 * overlap / (24 + 36))
    assert gtvp["volume_pred_ml"] == pytest.approx(24 * 2.0 / 1000)  # 24 voxels of 1 x 1 x 2 mm
    assert gtvp["volume_gt_ml"] == pytest.approx(36 * 2.0 / 1000)
    assert gtvp["intersection_ml"] == pytest.approx(overlap * 2.0 / 1000)
    gtvn = case_entry(result, "CHUM-001")["GTVn"]
    assert gtvn["dice"] == pytest.approx(1.0)
    assert gtvn["hd95_mm"] == pytest.approx(0.0)
    assert gtvn["volume_pred_ml"] == gtvn["volume_gt_ml"] == pytest.approx(27 * 2.0 / 1000)
    # one case: its Dice is the mean and, the sum having one term, also DSCagg
    assert result.mean["GTVp"]["dice"] == pytest.approx(2 * overlap / (24 + 36))
    assert result.aggregated_dice["GTVp"] == pytest.approx(2 * overlap / (24 + 36))
    assert result.aggregated_dice_mean == pytest.approx((2 * overlap / (24 + 36) + 1.0) / 2)


@pytest.mark.parametrize(("axis", "shift", "expected_mm"), [
    ("x", 2, 2 * 1.0),  # x spacing 1 mm (a (z, y, x)-reversed spacing would give 4 mm)
    ("z", 2, 2 * 2.0),  # z spacing 2 mm (reversed would give 2 mm)
    ("y", 3, 3 * 1.0),
])
def test_hd95_of_two_shifted_cubes(tmp_path: Path, axis: str, shift: int, expected_mm: float) -> None:
    """Two 4^3-voxel cubes, the second shifted by `shift` voxels along one axis. Surface voxels (MONAI: the mask
    minus its face-connected erosion) are 4^3 - 2^3 = 56 per cube; the 16 on the trailing face of each cube are
    exactly shift * spacing from the other cube (which has no voxel closer along that axis, and the facing voxel
    straight across lies on its surface), and no surface voxel is farther. 16/56 > 5%, so in both directions the
    95th percentile is that largest distance."""
    box = {"x": (2, 6), "y": (2, 6), "z": (2, 6)}
    moved = dict(box, **{axis: (2 + shift, 6 + shift)})
    pred = paint(blank(), GTVP, **moved)
    ref = paint(blank(), GTVP, **box)
    result = evaluate(tmp_path, {"c1": (pred, ref)})
    gtvp = case_entry(result, "c1")["GTVp"]
    assert gtvp["hd95_mm"] == pytest.approx(expected_mm)
    assert gtvp["dice"] == pytest.approx(2 * 16 * (4 - shift) / (64 + 64))
    assert result.mean["GTVp"]["hd95_mm"] == pytest.approx(expected_mm)


def test_hd95_ignores_a_lone_outlier_voxel(tmp_path: Path) -> None:
    """Prediction = the reference cube plus one voxel 8 mm away: its 57 surface voxels are 56 at distance 0 and one
    at 8 mm; 0.95 * (57 - 1) = 53.2 falls among the zeros, so HD95 is 0 (the plain Hausdorff distance would be 8)."""
    ref = paint(blank(), GTVP, x=(2, 6), y=(2, 6), z=(2, 6))
    pred = paint(ref.copy(), GTVP, x=(13, 14), y=(3, 4), z=(3, 4))  # x 13 vs the cube's last x 5: 8 voxels of 1 mm
    result = evaluate(tmp_path, {"c1": (pred, ref)})
    assert case_entry(result, "c1")["GTVp"]["hd95_mm"] == pytest.approx(0.0)


def test_aggregated_dice_differs_from_mean_dice(tmp_path: Path) -> None:
    big = paint(blank(), GTVP, x=(0, 4), y=(0, 4), z=(0, 4))  # 64 voxels, predicted exactly
    small_ref = paint(blank(), GTVP, x=(0, 1), y=(0, 1), z=(0, 2))  # 2 voxels...
    small_pred = paint(blank(), GTVP, x=(5, 6), y=(5, 6), z=(0, 2))  # ...missed by 2 other voxels
    mid_ref = paint(blank(), GTVP, x=(0, 2), y=(0, 2), z=(0, 2))  # 8 voxels...
    mid_pred = paint(blank(), GTVP, x=(0, 2), y=(0, 2), z=(0, 1))  # ...half of them predicted (4)
    result = evaluate(tmp_path, {"a": (big, big.copy()), "b": (small_pred, small_ref), "c": (mid_pred, mid_ref)})

    dice = {"a": 1.0, "b": 0.0, "c": 2 * 4 / (4 + 8)}
    for case, expected in dice.items():
        assert case_entry(result, case)["GTVp"]["dice"] == pytest.approx(expected)
    mean_dice = (1.0 + 0.0 + 2 / 3) / 3  # 0.556
    dsc_agg = 2 * (64 + 0 + 4) / ((64 + 64) + (2 + 2) + (4 + 8))  # 136 / 144 = 0.944
    assert result.mean["GTVp"]["dice"] == pytest.approx(mean_dice)
    assert result.aggregated_dice["GTVp"] == pytest.approx(dsc_agg)
    assert abs(dsc_agg - mean_dice) > 0.3
    # GTVn is absent everywhere on both sides: nothing to score at all
    assert math.isnan(result.aggregated_dice["GTVn"]) and result.mean["GTVn"]["n_dice"] == 0
    assert result.aggregated_dice_mean == pytest.approx(dsc_agg)  # mean over the labels that are defined


def test_aggregate_weighs_cases_by_physical_volume(tmp_path: Path) -> None:
    """HECKTOR sums volumes in physical units: a case on a 2 x 2 x 2 mm grid weighs 4x per voxel."""
    fine_ref = paint(blank(), GTVP, x=(0, 2), y=(0, 2), z=(0, 2))  # 8 voxels of 2 mm^3
    fine_pred = paint(blank(), GTVP, x=(0, 2), y=(0, 2), z=(0, 1))  # 4 of them
    coarse_ref = paint(blank(), GTVP, x=(0, 2), y=(0, 1), z=(0, 1))  # 2 voxels of 8 mm^3
    coarse_pred = blank()  # missed
    write(tmp_path / "pred", "fine", fine_pred)
    write(tmp_path / "gt", "fine", fine_ref)
    write(tmp_path / "pred", "coarse", coarse_pred, spacing=(2.0, 2.0, 2.0))
    write(tmp_path / "gt", "coarse", coarse_ref, spacing=(2.0, 2.0, 2.0))
    result = evaluate_folders(tmp_path / "pred", tmp_path / "gt")

    assert case_entry(result, "coarse")["GTVp"]["volume_gt_ml"] == pytest.approx(2 * 8.0 / 1000)
    mm3 = 2 * (4 * 2.0 + 0) / ((4 + 8) * 2.0 + (0 + 2) * 8.0)  # 16 / 40 = 0.4 (voxel counts would give 8/14)
    assert result.aggregated_dice["GTVp"] == pytest.approx(mm3)


def test_structure_absent_on_both_sides_is_nan_and_left_out(tmp_path: Path) -> None:
    no_nodes = paint(blank(), GTVP, x=(1, 4), y=(1, 4), z=(1, 4))  # GTVp only, on both sides
    ref2 = paint(paint(blank(), GTVP, x=(1, 4), y=(1, 4), z=(1, 4)), GTVN, x=(8, 12), y=(5, 8), z=(2, 4))  # 24
    pred2 = paint(paint(blank(), GTVP, x=(1, 4), y=(1, 4), z=(1, 4)), GTVN, x=(9, 12), y=(5, 8), z=(2, 4))  # 18
    result = evaluate(tmp_path, {"no-nodes": (no_nodes, no_nodes.copy()), "nodes": (pred2, ref2)},
                      json_out=tmp_path / "eval.json")

    gtvn = case_entry(result, "no-nodes")["GTVn"]
    assert math.isnan(gtvn["dice"]) and math.isnan(gtvn["hd95_mm"])
    assert gtvn["volume_pred_ml"] == gtvn["volume_gt_ml"] == gtvn["intersection_ml"] == 0.0
    dice_nodes = 2 * 18 / (18 + 24)
    assert case_entry(result, "nodes")["GTVn"]["dice"] == pytest.approx(dice_nodes)
    assert result.mean["GTVn"]["dice"] == pytest.approx(dice_nodes)  # not (dice_nodes + 0) / 2, not NaN
    assert result.mean["GTVn"]["n_dice"] == 1
    assert result.aggregated_dice["GTVn"] == pytest.approx(dice_nodes)  # the empty case adds 0 / 0
    saved = json.loads((tmp_path / "eval.json").read_text())
    (entry,) = [c for c in saved["per_case"] if c["case"] == "no-nodes"]
    assert entry["GTVn"]["dice"] is None and entry["GTVn"]["hd95_mm"] is None


def test_structure_on_one_side_only_scores_dice_zero(tmp_path: Path) -> None:
    ref = paint(blank(), GTVP, x=(1, 4), y=(1, 4), z=(1, 4))
    false_positive = paint(ref.copy(), GTVN, x=(8, 10), y=(8, 10), z=(5, 6))  # 4 GTVn voxels, none in the reference
    missed_ref = paint(ref.copy(), GTVN, x=(8, 11), y=(8, 10), z=(5, 6))  # 6 GTVn voxels, none predicted
    result = evaluate(tmp_path, {"fp": (false_positive, ref), "fn": (ref.copy(), missed_ref)})

    fp, fn = case_entry(result, "fp")["GTVn"], case_entry(result, "fn")["GTVn"]
    assert fp["dice"] == 0.0 and fn["dice"] == 0.0
    assert math.isnan(fp["hd95_mm"]) and math.isnan(fn["hd95_mm"])
    assert fp["volume_pred_ml"] == pytest.approx(4 * VOXEL_ML) and fp["volume_gt_ml"] == 0.0
    assert fn["volume_gt_ml"] == pytest.approx(6 * VOXEL_ML) and fn["volume_pred_ml"] == 0.0
    assert result.mean["GTVn"]["dice"] == 0.0 and result.mean["GTVn"]["n_dice"] == 2
    assert result.mean["GTVn"]["n_hd95"] == 0 and math.isnan(result.mean["GTVn"]["hd95_mm"])
    assert result.aggregated_dice["GTVn"] == 0.0


@pytest.mark.parametrize(("change", "word"), [
    ({"spacing": (1.0, 1.0, 2.5)}, "spacing"),
    ({"origin": (-7.5, 3.0, 13.0)}, "origin"),
    ({"direction": (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)}, "direction"),
    ({"size": (16, 12, 11)}, "size"),
])
def test_prediction_off_the_reference_grid_is_refused(tmp_path: Path, change: dict, word: str) -> None:
    arr = paint(blank(), GTVP, x=(1, 4), y=(1, 4), z=(1, 4))
    write(tmp_path / "pred", "good", arr)
    write(tmp_path / "gt", "good", arr)
    write(tmp_path / "gt", "MDA-042", arr)
    size = change.pop("size", SIZE)
    write(tmp_path / "pred", "MDA-042", paint(blank(size), GTVP, x=(1, 4), y=(1, 4), z=(1, 4)), **change)
    with pytest.raises(InputDataError, match=rf"MDA-042.*{word}"):
        evaluate_folders(tmp_path / "pred", tmp_path / "gt")


def test_rounding_of_the_header_is_not_a_mismatch(tmp_path: Path) -> None:
    arr = paint(blank(), GTVP, x=(1, 4), y=(1, 4), z=(1, 4))
    write(tmp_path / "gt", "c1", arr)
    write(tmp_path / "pred", "c1", arr, spacing=(1.0 + 1e-6, 1.0, 2.0), origin=(-7.5 + 1e-5, 3.0, 11.0))
    assert evaluate_folders(tmp_path / "pred", tmp_path / "gt").per_case[0]["GTVp"]["dice"] == 1.0


def test_missing_files_are_named(tmp_path: Path) -> None:
    arr = paint(blank(), GTVP, x=(1, 4), y=(1, 4), z=(1, 4))
    for case in ("CHUP-001", "CHUP-002"):
        write(tmp_path / "gt", case, arr)
    write(tmp_path / "pred", "CHUP-001", arr)
    write(tmp_path / "pred", "HGJ-007", arr)  # a prediction without a reference
    (tmp_path / "pred" / "dataset.json").write_text("{}")  # nnU-Net's extra files are not cases
    with pytest.raises(InputDataError, match="CHUP-002") as err:
        evaluate_folders(tmp_path / "pred", tmp_path / "gt")
    assert "HGJ-007" in str(err.value) and "CHUP-001" not in str(err.value)

    result = evaluate_folders(tmp_path / "pred", tmp_path / "gt", allow_missing=True)
    assert [c["case"] for c in result.per_case] == ["CHUP-001"]
    assert result.missing_predictions == ["CHUP-002"] and result.missing_references == ["HGJ-007"]
    assert "CHUP-002" in str(result)


def test_empty_or_absent_folders_are_errors(tmp_path: Path) -> None:
    (tmp_path / "pred").mkdir()
    write(tmp_path / "gt", "c1", blank())
    with pytest.raises(InputDataError, match="no prediction files"):
        evaluate_folders(tmp_path / "pred", tmp_path / "gt")
    with pytest.raises(InputDataError, match="does not exist"):
        evaluate_folders(tmp_path / "nowhere", tmp_path / "gt")


def test_unknown_label_value_in_a_prediction_is_named(tmp_path: Path) -> None:
    ref = paint(blank(), GTVP, x=(1, 4), y=(1, 4), z=(1, 4))
    pred = paint(ref.copy(), 3, x=(8, 9), y=(8, 9), z=(5, 6))
    with pytest.raises(InputDataError, match=r"CHUV-011.*prediction.* 3 "):
        evaluate(tmp_path, {"CHUV-011": (pred, ref)})


def test_unreadable_prediction_is_named(tmp_path: Path) -> None:
    arr = paint(blank(), GTVP, x=(1, 4), y=(1, 4), z=(1, 4))
    write(tmp_path / "gt", "CHUS-005", arr)
    (tmp_path / "pred").mkdir()
    (tmp_path / "pred" / "CHUS-005.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(InputDataError, match="CHUS-005.*cannot read"):
        evaluate_folders(tmp_path / "pred", tmp_path / "gt")


def test_json_round_trip_and_summary_table(tmp_path: Path) -> None:
    ref = paint(paint(blank(), GTVP, x=(2, 6), y=(2, 6), z=(2, 6)), GTVN, x=(9, 12), y=(8, 11), z=(6, 8))
    pred = paint(paint(blank(), GTVP, x=(4, 8), y=(2, 6), z=(2, 6)), GTVN, x=(9, 12), y=(8, 11), z=(6, 8))
    only_p = paint(blank(), GTVP, x=(2, 6), y=(2, 6), z=(2, 6))
    out = tmp_path / "reports" / "evaluation.json"
    result = evaluate(tmp_path, {"a": (pred, ref), "b": (only_p, only_p.copy())}, json_out=out)

    text = out.read_text()
    assert "NaN" not in text  # strict JSON: undefined values are null
    saved = json.loads(text)
    assert [p.name for p in out.parent.iterdir()] == ["evaluation.json"]  # no temporary file left behind
    assert saved["labels"] == {"GTVp": 1, "GTVn": 2} and saved["n_cases"] == 2
    dice_a = 2 * 32 / (64 + 64)  # x overlap 4..5 of 2..5: 2 * 4 * 4 = 32 voxels
    assert saved["per_case"][0]["GTVp"]["dice"] == pytest.approx(dice_a)
    assert saved["aggregated_dice"]["GTVp"] == pytest.approx(2 * (32 + 64) / (128 + 128))
    assert saved["mean"]["GTVn"] == {"dice": 1.0, "n_dice": 1, "hd95_mm": 0.0, "n_hd95": 1, "precision": 1.0,
                                     "n_precision": 1, "recall": 1.0, "n_recall": 1}
    assert saved["per_case"][0]["GTVp"]["precision"] == pytest.approx(32 / 64)  # H2ASeg's Table 1 metrics
    assert saved["per_case"][0]["GTVp"]["recall"] == pytest.approx(32 / 64)
    assert saved["per_case"][1]["GTVn"]["dice"] is None

    loaded = EvaluationResult.load(out)
    assert loaded.to_dict() == result.to_dict() == saved
    assert math.isnan(loaded.per_case[1]["GTVn"]["dice"])

    table = str(result)
    assert "GTVp" in table and "GTVn" in table
    assert f"{2 * (32 + 64) / 256:.4f}" in table  # GTVp DSCagg
    assert f"{(2 * 96 / 256 + 1.0) / 2:.4f}" in table  # mean of the two DSCagg


def test_pemma_evaluate_command(tmp_path: Path, nnunet_env: dict[str, str]) -> None:
    """The CLI: a table and a JSON file on success; exit code 2, the case named and no JSON on bad geometry."""
    from conftest import run_cli

    good = paint(blank(), GTVP, x=(2, 8), y=(2, 8), z=(2, 6))
    for folder in ("pred", "gt"):
        write(tmp_path / folder, "CHUM-001", good)
    proc = run_cli(["pemma", "evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--json",
                    str(tmp_path / "scores.json")], nnunet_env)
    assert proc.returncode == 0, proc.stderr
    assert "GTVp" in proc.stdout and json.loads((tmp_path / "scores.json").read_text())["per_case"]
    write(tmp_path / "pred", "CHUM-001", good, spacing=(2.0, 1.0, 2.0))
    proc = run_cli(["pemma", "evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--json",
                    str(tmp_path / "bad.json")], nnunet_env)
    assert proc.returncode == 2 and "CHUM-001" in proc.stderr and "spacing" in proc.stderr
    assert not (tmp_path / "bad.json").exists()


def test_precision_and_recall_match_monai_and_are_undefined_without_a_side():
    """H2ASeg's precision and recall, checked against MONAI's confusion-matrix metrics."""
    import torch
    from monai.metrics import compute_confusion_matrix_metric, get_confusion_matrix

    from nnunetv2_pemma.evaluation.metrics import case_metrics

    rng = np.random.default_rng(0)
    pred, ref = rng.integers(0, 3, (6, 7, 8)), rng.integers(0, 3, (6, 7, 8))
    ours = case_metrics(pred, ref, (1.0, 1.0, 1.0), 1)
    one_hot = [torch.from_numpy((a == 1)[None, None].astype(np.float32)) for a in (pred, ref)]
    matrix = get_confusion_matrix(*one_hot, include_background=True)
    assert ours["precision"] == pytest.approx(float(compute_confusion_matrix_metric("precision", matrix)))
    assert ours["recall"] == pytest.approx(float(compute_confusion_matrix_metric("sensitivity", matrix)))
    empty = np.zeros_like(pred)
    assert np.isnan(case_metrics(empty, ref, (1.0, 1.0, 1.0), 1)["precision"])
    assert case_metrics(empty, ref, (1.0, 1.0, 1.0), 1)["recall"] == 0.0
    assert np.isnan(case_metrics(pred, empty, (1.0, 1.0, 1.0), 1)["recall"])
