"""Bad HECKTOR input through the real `pemma convert-hecktor` CLI: a one-line error naming the case, the file and
the problem, exit code 2, and nothing written to nnUNet_raw (no dataset folder, no temporary folder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk

from hecktor_fixtures import image, make_ct, make_label, make_pet, patch_header, read_header, truncate, write, \
    write_case_2022, write_hecktor_2021, write_hecktor_2022

GOOD = ["CHUM-001", "CHUP-001"]
BAD = "CHUS-001"


def run_cli(root: Path, raw: Path, *args: str) -> subprocess.CompletedProcess:
    raw.mkdir(exist_ok=True)
    env = {**os.environ, "nnUNet_raw": str(raw)}
    return subprocess.run([sys.executable, "-m", "nnunetv2_pemma.cli", "convert-hecktor", str(root),
                           "--dataset-id", "501", "--name", "Bad", *args], env=env, capture_output=True, text=True)


def error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("pemma convert-hecktor: error: ")
    besides_progress = [ln for ln in done.stderr.replace("\r", "\n").splitlines() if ln.strip() and "case/s]" not in ln]
    assert besides_progress == [line]  # nothing from ITK or nibabel either
    return line


def _ct_path(root: Path) -> Path:
    return root / "imagesTr" / f"{BAD}__CT.nii.gz"


def _pet_path(root: Path) -> Path:
    return root / "imagesTr" / f"{BAD}__PT.nii.gz"


def _label_path(root: Path) -> Path:
    return root / "labelsTr" / f"{BAD}.nii.gz"


def _label_with(root: Path, **geometry: tuple) -> None:
    ct = make_ct(**geometry)
    write(make_label(ct), _label_path(root))


def _label_value_3(root: Path) -> None:
    label = make_label(make_ct())
    arr = sitk.GetArrayFromImage(label)
    arr[0, 0, 0] = 3
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(label)
    write(out, _label_path(root))


def _pet_with_nan(root: Path) -> None:
    pet = make_pet()
    arr = sitk.GetArrayFromImage(pet)
    arr[3, 4, 5] = np.nan
    write(image(arr, pet.GetSpacing(), pet.GetOrigin()), _pet_path(root))


def _ct_with_inf(root: Path) -> None:
    ct = make_ct()
    arr = sitk.GetArrayFromImage(ct).astype(np.float32)
    arr[1, 1, 1] = np.inf
    write(image(arr, ct.GetSpacing(), ct.GetOrigin()), _ct_path(root))


def _ct_4d(root: Path) -> None:
    sitk.WriteImage(sitk.Image([8, 8, 8, 2], sitk.sitkInt16), str(_ct_path(root)))


def _pet_2d(root: Path) -> None:
    sitk.WriteImage(sitk.Image([8, 8], sitk.sitkFloat32), str(_pet_path(root)))


def _corrupt_pet(root: Path) -> None:
    _pet_path(root).write_bytes(b"this is not a NIfTI file")


def _duplicate_label(root: Path) -> None:
    write(make_label(make_ct()), root / "labelsTr" / "CHUS_001.nii.gz")


def _duplicate_image(root: Path) -> None:
    write(make_ct(), root / "imagesTr" / "CHUS_001__CT.nii.gz")


def _label_value_almost_1(root: Path) -> None:
    label = make_label(make_ct())
    arr = sitk.GetArrayFromImage(label).astype(np.float32)
    arr[0, 0, 0] = np.float32(1.0000001)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(label)
    write(out, _label_path(root))


def _truncated_label(root: Path) -> None:
    """A label whose first half (header included) is intact: random values compress too badly to fit the header's
    share of the file. SimpleITK reads the rest as background."""
    label = make_label(make_ct())
    arr = np.random.default_rng(0).integers(0, 3, sitk.GetArrayViewFromImage(label).shape).astype(np.uint8)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(label)
    truncate(write(out, _label_path(root)))


def _uncompressed_truncated_ct(root: Path) -> None:
    write(make_ct(), root / "imagesTr" / f"{BAD}__CT.nii")
    _ct_path(root).unlink()
    truncate(root / "imagesTr" / f"{BAD}__CT.nii")


def _bad_gzip_crc(path: Path) -> None:
    """Flip a bit of the gzip trailer's CRC: every voxel inflates, only the end of the stream tells (SimpleITK
    notices; nibabel, which stops after the voxels, is made to read on to the end too)."""
    data = bytearray(path.read_bytes())
    data[-8] ^= 1
    path.write_bytes(bytes(data))


def _sheared_sform(root: Path) -> None:
    sform = read_header(_ct_path(root)).get_sform()
    sform[0, 1] = 2.0  # x grows along the second voxel axis too: axes 45 degrees apart
    patch_header(_ct_path(root), sform=(sform, 1))


def _sform_off_qform(root: Path) -> None:
    sform = read_header(_ct_path(root)).get_sform()
    sform[2, 3] += 10.0  # 10 mm higher than the qform says; SimpleITK takes the sform, and the label stays put
    patch_header(_ct_path(root), sform=(sform, 1))


def _ct_without_body(root: Path) -> None:
    ct = make_ct()
    write(image(np.full(tuple(reversed(ct.GetSize())), -1000, np.int16), ct.GetSpacing(), ct.GetOrigin()),
          _ct_path(root))


BAD_INPUTS: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "missing PET": (lambda r: _pet_path(r).unlink(), ["missing PET file imagesTr/CHUS-001__PT.nii.gz"]),
    "missing CT": (lambda r: _ct_path(r).unlink(), ["missing CT file imagesTr/CHUS-001__CT.nii.gz"]),
    "missing label": (lambda r: _label_path(r).unlink(), ["missing label file labelsTr/CHUS-001.nii.gz"]),
    "label values": (_label_value_3, ["labelsTr/CHUS-001.nii.gz has values {3} outside {0, 1, 2}"]),
    "label origin": (lambda r: _label_with(r, origin=(-21.0, -23.0, -23.0)),
                     ["labelsTr/CHUS-001.nii.gz is not on its CT's grid: origin"]),
    "label spacing": (lambda r: _label_with(r, spacing=(2.0, 2.0, 2.5)), ["not on its CT's grid: spacing"]),
    "label size": (lambda r: _label_with(r, size=(24, 24, 20)), ["not on its CT's grid: size"]),
    "label direction": (lambda r: _label_with(r, direction=(1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)),
                        ["not on its CT's grid: direction"]),
    "PET elsewhere": (lambda r: write(make_pet(origin=(500.0, 0.0, 0.0)), _pet_path(r)),
                      ["PET file imagesTr/CHUS-001__PT.nii.gz does not overlap the CT"]),
    "NaN PET": (_pet_with_nan, ["PET file imagesTr/CHUS-001__PT.nii.gz has 1 NaN/inf voxels"]),
    "inf CT": (_ct_with_inf, ["CT file imagesTr/CHUS-001__CT.nii.gz has 1 NaN/inf voxels"]),
    "4-D CT": (_ct_4d, ["CT file imagesTr/CHUS-001__CT.nii.gz is 4-D", "expected a 3-D image"]),
    "2-D PET": (_pet_2d, ["PET file imagesTr/CHUS-001__PT.nii.gz is 2-D"]),
    "corrupt PET": (_corrupt_pet, ["cannot read PET file imagesTr/CHUS-001__PT.nii.gz"]),
    "duplicate label": (_duplicate_label, ["2 label files map to this case id", "labelsTr/CHUS-001.nii.gz",
                                           "labelsTr/CHUS_001.nii.gz"]),
    "duplicate image": (_duplicate_image, ["2 CT files map to this case id", "imagesTr/CHUS_001__CT.nii.gz"]),
    "CT without body": (_ct_without_body, ["CT file imagesTr/CHUS-001__CT.nii.gz: no body in the CT"]),
    "case among test and training cases": (lambda r: write_case_2022(r, BAD, test=True),
                                           ["has files among the test cases (imagesTs/, labelsTs/) and among the "
                                            "training cases (imagesTr/, labelsTr/)"]),
    "label value 1.0000001": (_label_value_almost_1,
                              ["label file labelsTr/CHUS-001.nii.gz has values {1.0000001} outside {0, 1, 2}"]),
    # SimpleITK reads the missing half as zeros without an error
    "truncated CT": (lambda r: truncate(_ct_path(r)),
                     ["CT file imagesTr/CHUS-001__CT.nii.gz is truncated or corrupt: nibabel cannot decode it "
                      "(EOFError: Compressed file ended before the end-of-stream marker was reached)"]),
    "truncated label": (_truncated_label,
                        ["label file labelsTr/CHUS-001.nii.gz is truncated or corrupt: nibabel cannot decode it "
                         "(EOFError: Compressed file ended before the end-of-stream marker was reached)"]),
    "truncated .nii": (_uncompressed_truncated_ct,
                       ["CT file imagesTr/CHUS-001__CT.nii is truncated or corrupt: nibabel cannot decode it "
                        "(OSError: Expected 27648 bytes, got 13648 bytes from imagesTr/CHUS-001__CT.nii - could the "
                        "file be damaged?)"]),
    "bad gzip CRC": (lambda r: _bad_gzip_crc(_pet_path(r)), ["cannot read PET file imagesTr/CHUS-001__PT.nii.gz"]),
    # NIfTI: scl_slope 0 means "not scaled"; SimpleITK still adds scl_inter
    "slope 0 with an intercept": (lambda r: patch_header(_ct_path(r), scl_slope=0.0, scl_inter=5.0),
                                  ["CT file imagesTr/CHUS-001__CT.nii.gz is corrupt or ambiguous: SimpleITK and nibabel "
                                   "read 13824 of 13824 voxels differently (first at voxel (0, 0, 0): SimpleITK -995.0, "
                                   "nibabel -1000)"]),
    # SimpleITK reads a zero voxel size as 1 mm and mirrors an axis whose size is negative
    "zero pixdim CT": (lambda r: patch_header(_ct_path(r), pixdim=(2.0, 0.0, 2.0)),
                       ["CT file imagesTr/CHUS-001__CT.nii.gz has voxel sizes (pixdim) (2, 0, 2) mm in its header; "
                        "they must be finite and positive (SimpleITK reads 0 as 1 mm and mirrors an axis whose size "
                        "is negative)"]),
    "negative pixdim PET": (lambda r: patch_header(_pet_path(r), pixdim=(4.0, 4.0, -4.0)),
                            ["PET file imagesTr/CHUS-001__PT.nii.gz has voxel sizes (pixdim) (4, 4, -4) mm in its "
                             "header; they must be finite and positive"]),
    "negative pixdim CT": (lambda r: patch_header(_ct_path(r), pixdim=(2.0, 2.0, -2.0)),
                           ["CT file imagesTr/CHUS-001__CT.nii.gz has voxel sizes (pixdim) (2, 2, -2) mm"]),
    "negative pixdim label": (lambda r: patch_header(_label_path(r), pixdim=(-2.0, 2.0, 2.0)),
                              ["label file labelsTr/CHUS-001.nii.gz has voxel sizes (pixdim) (-2, 2, 2) mm"]),
    "sheared sform": (_sheared_sform, ["CT file imagesTr/CHUS-001__CT.nii.gz has an sform whose axes 0 and 1 are "
                                       "not perpendicular (45.0 degrees apart, not 90)"]),
    "sform and qform disagree": (_sform_off_qform,
                                 ["CT file imagesTr/CHUS-001__CT.nii.gz has an sform and a qform that disagree "
                                  "(sform != qform): origin (23, 23, -13) != (23, 23, -23)"]),
}


@pytest.mark.parametrize("problem", list(BAD_INPUTS))
def test_bad_case_is_named_and_nothing_is_written(tmp_path: Path, problem: str) -> None:
    root = write_hecktor_2022(tmp_path / "in", GOOD + [BAD])
    damage, expected = BAD_INPUTS[problem]
    damage(root)
    line = error_line(run_cli(root, tmp_path / "raw"))
    assert f"1 of 3 case(s) in {root} are bad, nothing was written" in line
    assert f"{BAD}: " in line
    for text in expected:
        assert text in line
    assert not any(c in line for c in GOOD)
    assert list((tmp_path / "raw").iterdir()) == []


def test_every_bad_case_is_listed(tmp_path: Path) -> None:
    root = write_hecktor_2022(tmp_path / "in", GOOD + [BAD, "HGJ-001"])
    _pet_path(root).unlink()
    _label_value_3(root)
    (root / "labelsTr" / "HGJ-001.nii.gz").unlink()
    line = error_line(run_cli(root, tmp_path / "raw"))
    assert "2 of 4 case(s)" in line
    assert (f"{BAD}: missing PET file imagesTr/CHUS-001__PT.nii.gz and label file labelsTr/CHUS-001.nii.gz has "
            f"values {{3}}") in line
    assert "HGJ-001: missing label file labelsTr/HGJ-001.nii.gz" in line
    assert list((tmp_path / "raw").iterdir()) == []


def test_unknown_centre(tmp_path: Path) -> None:
    root = write_hecktor_2022(tmp_path / "in", GOOD + ["XYZ-001"])
    line = error_line(run_cli(root, tmp_path / "raw"))
    assert "XYZ-001: unknown centre 'XYZ'" in line
    assert list((tmp_path / "raw").iterdir()) == []


def test_requested_centre_without_cases(tmp_path: Path) -> None:
    root = write_hecktor_2022(tmp_path / "in", GOOD)
    line = error_line(run_cli(root, tmp_path / "raw", "--centers", "CHUM", "HMR"))
    assert "no cases of centre(s) HMR" in line and "found: CHUM, CHUP" in line
    line = error_line(run_cli(root, tmp_path / "raw", "--centers", "NOPE"))
    assert "unknown centre(s) NOPE in --centers" in line
    assert list((tmp_path / "raw").iterdir()) == []


def test_existing_output_folder_is_refused(tmp_path: Path) -> None:
    root = write_hecktor_2022(tmp_path / "in", GOOD)
    existing = tmp_path / "raw" / "Dataset501_Bad"
    existing.mkdir(parents=True)
    (existing / "keep.txt").write_text("mine")
    line = error_line(run_cli(root, tmp_path / "raw"))
    assert f"output folder {existing} already exists" in line
    assert [p.name for p in (tmp_path / "raw").iterdir()] == ["Dataset501_Bad"]
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


def test_dataset_id_used_by_another_dataset_is_refused(tmp_path: Path) -> None:
    root = write_hecktor_2022(tmp_path / "in", GOOD)
    (tmp_path / "raw" / "Dataset501_Other").mkdir(parents=True)
    line = error_line(run_cli(root, tmp_path / "raw"))
    assert "dataset id 501 is already used by Dataset501_Other" in line
    assert [p.name for p in (tmp_path / "raw").iterdir()] == ["Dataset501_Other"]


def test_skip_bad_converts_the_rest_and_lists_the_skipped(tmp_path: Path) -> None:
    root = write_hecktor_2022(tmp_path / "in", GOOD + [BAD])
    _pet_path(root).unlink()
    done = run_cli(root, tmp_path / "raw", "--skip-bad")
    assert done.returncode == 0, done.stderr
    assert f"{BAD}: missing PET file imagesTr/CHUS-001__PT.nii.gz" in done.stdout
    out = tmp_path / "raw" / "Dataset501_Bad"
    assert [p.name for p in (tmp_path / "raw").iterdir()] == ["Dataset501_Bad"]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in GOOD]
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["numTraining"] == 2
    assert dataset["pemma"]["skipped"] == {BAD: "missing PET file imagesTr/CHUS-001__PT.nii.gz"}


def test_skip_bad_with_nothing_valid_left(tmp_path: Path) -> None:
    root = write_hecktor_2022(tmp_path / "in", [BAD])
    _pet_path(root).unlink()
    line = error_line(run_cli(root, tmp_path / "raw", "--skip-bad"))
    assert "no valid training case left" in line and f"{BAD}: missing PET file" in line
    assert list((tmp_path / "raw").iterdir()) == []


def test_ct_only_ignores_a_bad_pet(tmp_path: Path) -> None:
    root = write_hecktor_2022(tmp_path / "in", GOOD + [BAD])
    _corrupt_pet(root)
    done = run_cli(root, tmp_path / "raw", "--modalities", "CT")
    assert done.returncode == 0, done.stderr


def test_2021_case_missing_from_the_bbox_csv(tmp_path: Path) -> None:
    root = write_hecktor_2021(tmp_path / "in", ["CHGJ007", "CHMR001"], box_mm=((-14, -14, -20), (14, 14, 20)))
    ct = make_ct()
    write(ct, root / "CHUS003_ct.nii.gz")
    write(make_pet(), root / "CHUS003_pt.nii.gz")
    write(make_label(ct, gtvn=False), root / "CHUS003_gtvt.nii.gz")
    line = error_line(run_cli(root, tmp_path / "raw", "--edition", "2021"))
    assert "CHUS003: no bounding box for CHUS003 in hecktor2021_bbox_training.csv" in line
    assert list((tmp_path / "raw").iterdir()) == []


def test_2021_gtvn_label_is_outside_the_2021_labels(tmp_path: Path) -> None:
    root = write_hecktor_2021(tmp_path / "in", ["CHGJ007"], box_mm=((-14, -14, -20), (14, 14, 20)))
    write(make_label(make_ct(), gtvn=True), root / "CHGJ007_gtvt.nii.gz")
    line = error_line(run_cli(root, tmp_path / "raw", "--edition", "2021"))
    assert "CHGJ007: label file CHGJ007_gtvt.nii.gz has values {2} outside {0, 1}" in line


def test_2021_folder_without_bbox_csv(tmp_path: Path) -> None:
    root = write_hecktor_2021(tmp_path / "in", ["CHGJ007"], box_mm=((-14, -14, -20), (14, 14, 20)))
    (root / "hecktor2021_bbox_training.csv").unlink()
    line = error_line(run_cli(root, tmp_path / "raw", "--edition", "2021"))
    assert "no hecktor2021_bbox_*.csv in" in line and "--crop none" in line
    assert run_cli(root, tmp_path / "raw", "--edition", "2021", "--crop", "none").returncode == 0


def test_not_a_hecktor_folder(tmp_path: Path) -> None:
    root = write_hecktor_2021(tmp_path / "in", ["CHGJ007"], box_mm=((-14, -14, -20), (14, 14, 20)))
    line = error_line(run_cli(root, tmp_path / "raw"))
    assert "no imagesTr/ folder" in line and "use --edition 2021" in line
    line = error_line(run_cli(tmp_path / "nowhere", tmp_path / "raw"))
    assert "does not exist" in line
    assert list((tmp_path / "raw").iterdir()) == []
