"""HECKTOR -> nnU-Net raw conversion on tiny synthetic multi-centre sets: layout, dataset.json, splits, variants."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_cli, run_ok
from hecktor_fixtures import make_ct, write_hecktor_2021, write_hecktor_2022
from nnunetv2_pemma.data.centers import LABELS_2021, LABELS_2022
from nnunetv2_pemma.data.geometry import load_crop_records
from nnunetv2_pemma.data.hecktor import convert_hecktor
from nnunetv2_pemma.data.splits import make_center_splits, write_splits_to_preprocessed
from nnunetv2_pemma.errors import InputDataError, PlansError

REPO = Path(__file__).resolve().parents[1]
TRAIN = [f"CHUM-{i:03d}" for i in range(1, 6)] + [f"CHUP-{i:03d}" for i in range(1, 6)] + ["MDA-001", "MDA-002"]
TEST = ["USZ-001", "CHB-001"]


@pytest.fixture(scope="module")
def hecktor_2022(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hecktor_2022(tmp_path_factory.mktemp("hecktor") / "in", TRAIN, TEST)


@pytest.fixture(scope="module")
def ct_pet(hecktor_2022: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    raw = tmp_path_factory.mktemp("raw")
    report = convert_hecktor(hecktor_2022, dataset_id=501, name="HNC_CT_PET", modalities=["CT", "PET"],
                             raw_root=raw)
    return report.dataset_dir, str(report)


def test_ct_pet_layout(ct_pet: tuple[Path, str]) -> None:
    out, _ = ct_pet
    assert out.name == "Dataset501_HNC_CT_PET"
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == \
           sorted(f"{c}_{ch:04d}.nii.gz" for c in TRAIN for ch in (0, 1))
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == sorted(f"{c}.nii.gz" for c in TRAIN)
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == \
           sorted(f"{c}_{ch:04d}.nii.gz" for c in TEST for ch in (0, 1))
    ct = sitk.ReadImage(str(out / "imagesTr" / "CHUM-001_0000.nii.gz"))
    pet = sitk.ReadImage(str(out / "imagesTr" / "CHUM-001_0001.nii.gz"))
    label = sitk.ReadImage(str(out / "labelsTr" / "CHUM-001.nii.gz"))
    assert (ct.GetPixelID(), pet.GetPixelID(), label.GetPixelID()) == \
           (sitk.sitkInt16, sitk.sitkFloat32, sitk.sitkUInt8)
    assert ct.GetSize() == pet.GetSize() == label.GetSize()
    assert set(np.unique(sitk.GetArrayFromImage(label))) == {0, 1, 2}
    assert sitk.GetArrayFromImage(ct).min() == -1000  # HU kept


def test_ct_pet_dataset_json(ct_pet: tuple[Path, str], hecktor_2022: Path) -> None:
    out, _ = ct_pet
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "CT", "1": "PET"}
    assert dataset["labels"] == LABELS_2022
    assert dataset["numTraining"] == len(TRAIN) and dataset["file_ending"] == ".nii.gz"
    pemma = dataset["pemma"]
    assert pemma["modalities"] == ["CT", "PET"] and pemma["edition"] == 2022 and pemma["pet_units"] == "SUV"
    assert pemma["crop"] == "headneck" and pemma["crop_size_mm"] == [200.0, 200.0, 310.0]
    assert pemma["centers"] == {c: c.split("-")[0] for c in TRAIN + TEST}
    assert pemma["source"] == str(hecktor_2022) and pemma["skipped"] == {}
    records = load_crop_records(out)
    assert sorted(records) == sorted(TRAIN + TEST)
    assert records["USZ-001"]["split"] == "test" and records["CHUM-001"]["split"] == "train"
    assert records["CHUM-001"]["original"]["size"] == list(make_ct().GetSize())


def test_splits_are_stratified_by_centre(ct_pet: tuple[Path, str]) -> None:
    out, report = ct_pet
    splits = json.loads((out / "splits_final.json").read_text())
    assert len(splits) == 5
    vals = [set(fold["val"]) for fold in splits]
    assert sorted(c for v in vals for c in v) == sorted(TRAIN)  # every case in exactly one val fold
    for fold, val in zip(splits, vals):
        assert set(fold["train"]) == set(TRAIN) - val
        assert {c.split("-")[0] for c in val} >= {"CHUM", "CHUP"}  # centres with >= 5 cases: in every val fold
    assert sorted(len(v) for v in vals) == [2, 2, 2, 3, 3]
    assert "stratified by centre" in report and "12 training, 2 test" in report


def test_splits_are_seeded_and_copied_to_preprocessed(ct_pet: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = ct_pet
    centres = {c: c.split("-")[0] for c in TRAIN}
    assert make_center_splits(centres) == json.loads((out / "splits_final.json").read_text())
    assert make_center_splits(centres, seed=1) != make_center_splits(centres)
    copied = write_splits_to_preprocessed(out, tmp_path / "Dataset501_HNC_CT_PET")
    assert copied == tmp_path / "Dataset501_HNC_CT_PET" / "splits_final.json"
    assert json.loads(copied.read_text()) == json.loads((out / "splits_final.json").read_text())


def test_nnunet_planner_copies_the_raw_splits(hecktor_2022: Path, nnunet_env: dict[str, str]) -> None:
    """nnUNetv2_plan_and_preprocess installs the converter's splits itself; `pemma plans add` then finds them."""
    report = convert_hecktor(hecktor_2022, dataset_id=506, name="HNC_CT", modalities=["CT"],
                             raw_root=Path(nnunet_env["nnUNet_raw"]))
    run_ok(["nnUNetv2_plan_and_preprocess", "-d", "506", "--no_pp", "-npfp", "1"], nnunet_env)
    installed = Path(nnunet_env["nnUNet_preprocessed"]) / "Dataset506_HNC_CT" / "splits_final.json"
    raw = json.loads((report.dataset_dir / "splits_final.json").read_text())
    assert json.loads(installed.read_text()) == raw
    assert write_splits_to_preprocessed(report.dataset_dir, installed.parent) == installed
    assert json.loads(installed.read_text()) == raw


def test_other_preprocessed_splits_are_named_not_overwritten(ct_pet: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = ct_pet
    other = [{"train": fold["val"], "val": fold["train"]}
             for fold in json.loads((out / "splits_final.json").read_text())]
    (tmp_path / "splits_final.json").write_text(json.dumps(other))
    with pytest.raises(PlansError, match=re.escape(f"{tmp_path / 'splits_final.json'} has other folds than "
                                                   f"{out / 'splits_final.json'}")):
        write_splits_to_preprocessed(out, tmp_path)
    assert json.loads((tmp_path / "splits_final.json").read_text()) == other


def test_ct_only_needs_no_pet(tmp_path: Path) -> None:
    root = write_hecktor_2022(tmp_path / "in", ["CHUM-001", "HGJ-001"])
    for pet in root.glob("imagesTr/*__PT.nii.gz"):
        pet.unlink()
    report = convert_hecktor(root, dataset_id=502, name="HNC_CT", modalities=["CT"], raw_root=tmp_path / "raw")
    out = report.dataset_dir
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["CHUM-001_0000.nii.gz", "HGJ-001_0000.nii.gz"]
    assert json.loads((out / "dataset.json").read_text())["channel_names"] == {"0": "CT"}
    assert not (out / "splits_final.json").exists() and not (out / "imagesTs").exists()
    assert "splits: none (fewer than 5 training cases" in str(report)
    assert ("too few for nnU-Net's 5-fold cross-validation): train on all of them with fold `all` (nnUNetv2_train 502 "
            "CONFIGURATION all -tr TRAINER) or convert more cases") in str(report)
    assert write_splits_to_preprocessed(out, tmp_path / "pp") is None


def test_pet_only_and_centre_selection(hecktor_2022: Path, tmp_path: Path) -> None:
    report = convert_hecktor(hecktor_2022, dataset_id=503, name="HNC_PET", modalities=["PET"], centers=["MDA"],
                             raw_root=tmp_path / "raw")
    out = report.dataset_dir
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["MDA-001_0000.nii.gz", "MDA-002_0000.nii.gz"]
    assert not (out / "imagesTs").exists()  # the test centres were not selected
    assert json.loads((out / "dataset.json").read_text())["channel_names"] == {"0": "PET"}
    pet = sitk.ReadImage(str(out / "imagesTr" / "MDA-001_0000.nii.gz"))
    assert pet.GetPixelID() == sitk.sitkFloat32 and pet.GetSpacing() == make_ct().GetSpacing()


def test_underscore_labels_are_accepted_and_odd_names_reported(tmp_path: Path) -> None:
    root = write_hecktor_2022(tmp_path / "in", ["CHUM-001"])
    (root / "labelsTr" / "CHUM-001.nii.gz").rename(root / "labelsTr" / "CHUM_001.nii.gz")
    shutil.copy(root / "imagesTr" / "CHUM-001__CT.nii.gz", root / "imagesTr" / "CHUM-001__MR.nii.gz")
    report = convert_hecktor(root, dataset_id=504, name="X", raw_root=tmp_path / "raw")
    assert report.training_cases == ["CHUM-001"]
    assert (report.dataset_dir / "labelsTr" / "CHUM-001.nii.gz").is_file()
    assert "ignored 1 file(s) with unexpected names: imagesTr/CHUM-001__MR.nii.gz" in str(report)


def test_2021_layout_with_bbox_csv(tmp_path: Path) -> None:
    cases = ["CHGJ007", "CHMR001", "CHUS003"]
    root = write_hecktor_2021(tmp_path / "in", cases, box_mm=((-14.0, -14.0, -20.0), (14.0, 14.0, 20.0)))
    report = convert_hecktor(root, dataset_id=505, name="HECKTOR2021", edition=2021, raw_root=tmp_path / "raw")
    out = report.dataset_dir
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["labels"] == LABELS_2021 and dataset["numTraining"] == 3
    assert dataset["pemma"]["edition"] == 2021 and dataset["pemma"]["crop_size_mm"] is None
    assert dataset["pemma"]["centers"] == {"CHGJ007": "CHGJ", "CHMR001": "CHMR", "CHUS003": "CHUS"}
    label = sitk.ReadImage(str(out / "labelsTr" / "CHGJ007.nii.gz"))
    assert label.GetSize() == (14, 14, 20)  # voxel centres -13..13, -19..19 mm on the 2 mm grid
    assert label.GetOrigin() == (-13.0, -13.0, -19.0)
    assert set(np.unique(sitk.GetArrayFromImage(label))) == {0, 1}
    assert load_crop_records(out)["CHGJ007"]["crop_start"] == [5, 5, 2]


def test_missing_nnunet_raw_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(InputDataError, match="nnUNet_raw is not set"):
        convert_hecktor(tmp_path, dataset_id=506, name="X")


def test_nnunet_style_script(hecktor_2022: Path, tmp_path: Path) -> None:
    env = {**os.environ, "nnUNet_raw": str(tmp_path)}
    done = subprocess.run([sys.executable, str(REPO / "dataset_conversion" / "Dataset500_HECKTOR2022.py"),
                           str(hecktor_2022), "--modalities", "CT"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "Dataset500_HECKTOR2022" / "dataset.json").is_file()
    assert "Dataset500_HECKTOR2022" in done.stdout


@pytest.mark.slow
def test_nnunet_plan_and_preprocess_accepts_the_dataset(tmp_path: Path) -> None:
    cases = [f"CHUM-{i:03d}" for i in range(1, 4)] + [f"MDA-{i:03d}" for i in range(1, 4)]
    root = write_hecktor_2022(tmp_path / "in", cases)
    env = {**os.environ, "nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "pp"),
           "nnUNet_results": str(tmp_path / "results"), "nnUNet_def_n_proc": "1"}
    convert_hecktor(root, dataset_id=507, name="HNC_CT_PET", raw_root=tmp_path / "raw")
    done = run_cli(["nnUNetv2_plan_and_preprocess", "-d", "507", "-c", "3d_fullres", "--verify_dataset_integrity",
                    "-np", "1", "-npfp", "1"], env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    pp = tmp_path / "pp" / "Dataset507_HNC_CT_PET"
    plans = json.loads((pp / "nnUNetPlans.json").read_text())
    assert "3d_fullres" in plans["configurations"]
    assert len(list((pp / "nnUNetPlans_3d_fullres").glob("*.b2nd"))) >= len(cases)


def test_labelled_test_cases_go_to_labels_ts_and_no_split(tmp_path: Path) -> None:
    """HECKTOR's released test labels (labelsTs/): imagesTs/ + labelsTs/ in the nnU-Net dataset, never in a split."""
    from nnunetv2_pemma.data.phantom import write_phantom

    phantom = write_phantom(tmp_path / "in", 1, labelled_test_cases_per_center=2)
    centres = ["CHUM", "CHUP", "CHUS", "CHUV", "MDA"]
    report = convert_hecktor(tmp_path / "in", dataset_id=507, name="HNC", centers=centres, modalities=["CT", "PET"],
                             raw_root=tmp_path / "raw")
    out = report.dataset_dir
    test = [c for c in phantom.labelled_test_case_ids if c.split("-")[0] in centres]
    assert report.labelled_test_cases == report.test_cases == test and len(test) == 10
    assert sorted(p.name for p in (out / "labelsTs").iterdir()) == [f"{c}.nii.gz" for c in test]
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == [f"{c}_{i:04d}.nii.gz" for c in test for i in (0, 1)]
    for fold in json.loads((out / "splits_final.json").read_text()):
        assert not set(test) & set(fold["train"] + fold["val"])
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 5
    label = sitk.ReadImage(str(out / "labelsTs" / f"{test[0]}.nii.gz"))
    ct = sitk.ReadImage(str(out / "imagesTs" / f"{test[0]}_0000.nii.gz"))
    assert label.GetPixelID() == sitk.sitkUInt8 and label.GetSize() == ct.GetSize()
    # the small phantom lies inside the head-and-neck box: the label is the original one
    assert np.array_equal(sitk.GetArrayFromImage(label), sitk.GetArrayFromImage(sitk.ReadImage(
        str(tmp_path / "in" / "labelsTs" / f"{test[0]}.nii.gz"))))
    assert "10 test (10 labelled, in labelsTs/)" in str(report)


def test_a_test_label_beside_training_images_is_refused(tmp_path: Path) -> None:
    root = write_hecktor_2022(tmp_path / "in", ["CHUM-001", "CHUM-002"])
    (root / "labelsTs").mkdir()
    shutil.copy(root / "labelsTr" / "CHUM-001.nii.gz", root / "labelsTs" / "CHUM-001.nii.gz")
    with pytest.raises(InputDataError, match=r"CHUM-001.*among the test cases .* and among the training cases"):
        convert_hecktor(root, dataset_id=508, name="X", modalities=["CT"], raw_root=tmp_path / "raw")
    assert not (tmp_path / "raw").exists() or not list((tmp_path / "raw").glob("Dataset508_*"))
