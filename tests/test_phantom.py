"""The synthetic HECKTOR 2022 phantom: layout, image geometry and types, determinism, the PET/CT properties the
segmentation experiments rely on, the survival signal, and argument checking."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from lifelines import CoxPHFitter
from lifelines.utils import concordance_index
from scipy import ndimage

from nnunetv2_pemma.data.centers import LABELS_2022, TEST_CENTERS_2022, TRAINING_CENTERS_2022
from nnunetv2_pemma.data.centre_statistics import centre_statistics
from nnunetv2_pemma.data.phantom import (BODY, CENTER_EFFECTS, CLINICAL_COLUMNS, CLINICAL_CSV, ENDPOINT_COLUMNS,
                                         ENDPOINT_CSV, GTVP_HU_ABOVE_MUSCLE, GTVP_SUV, MIMIC_SUV, MUSCLE,
                                         NODE_HU_ABOVE_MUSCLE, RISK_HPV_POSITIVE, RISK_LOG_SUV, RISK_LOG_VOLUME,
                                         RISK_PER_NODE, RISK_PER_YEAR_OVER_60, SIZES, SOFT, PhantomSummary, _case_rngs,
                                         _patient_record, _render, case_model, write_phantom)
from nnunetv2_pemma.errors import InputDataError

CASES_PER_CENTER = 4
SEED = 0


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PhantomSummary]:
    out = tmp_path_factory.mktemp("phantom") / "hecktor"
    return out, write_phantom(out, CASES_PER_CENTER, size="small", seed=SEED, test_cases_per_center=1)


def read(path: Path) -> tuple[sitk.Image, np.ndarray]:
    image = sitk.ReadImage(str(path))
    return image, sitk.GetArrayFromImage(image)


def training_ids() -> list[str]:
    return [f"{c}-{i:03d}" for c in TRAINING_CENTERS_2022 for i in range(1, CASES_PER_CENTER + 1)]


def case_arrays(root: Path, case_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, sitk.Image]:
    """CT (HU), PET resampled onto the label grid in physical space, label, and the label image."""
    _, ct = read(root / "imagesTr" / f"{case_id}__CT.nii.gz")
    pet, _ = read(root / "imagesTr" / f"{case_id}__PT.nii.gz")
    label, lab = read(root / "labelsTr" / f"{case_id}.nii.gz")
    pet_on_label = sitk.GetArrayFromImage(sitk.Resample(pet, label, sitk.Transform(), sitk.sitkLinear, 0.0))
    return ct.astype(np.float64), pet_on_label, lab, label


def test_layout_and_file_names(phantom: tuple[Path, PhantomSummary]) -> None:
    root, summary = phantom
    ids = training_ids()
    expected_tr = {f"{i}__{m}.nii.gz" for i in ids for m in ("CT", "PT")}
    assert {p.name for p in (root / "imagesTr").iterdir()} == expected_tr
    assert {p.name for p in (root / "labelsTr").iterdir()} == {f"{i}.nii.gz" for i in ids}
    test_names = {p.name for p in (root / "imagesTs").iterdir()}
    assert len(test_names) == 2 * len(TEST_CENTERS_2022)
    assert {n.split("-")[0] for n in test_names} == set(TEST_CENTERS_2022)
    assert "USZ-001__CT.nii.gz" in test_names and "USZ-001__PT.nii.gz" in test_names
    assert not set(summary.test_case_ids) & set(summary.case_ids), "a test id repeats a training id"
    assert summary.case_ids == tuple(ids) and len(summary.test_case_ids) == len(TEST_CENTERS_2022)
    assert sorted(p.name for p in root.iterdir()) == sorted(["imagesTr", "imagesTs", "labelsTr", CLINICAL_CSV,
                                                             ENDPOINT_CSV])
    assert not [p for p in root.parent.iterdir() if p != root], "temporary folder left behind"
    text = str(summary)
    assert str(root) in text and str(len(ids)) in text


def test_types_and_geometry(phantom: tuple[Path, PhantomSummary]) -> None:
    root, _ = phantom
    for case_id in training_ids():
        ct, ct_arr = read(root / "imagesTr" / f"{case_id}__CT.nii.gz")
        pet, pet_arr = read(root / "imagesTr" / f"{case_id}__PT.nii.gz")
        label, lab = read(root / "labelsTr" / f"{case_id}.nii.gz")
        assert ct.GetPixelID() == sitk.sitkInt16 and pet.GetPixelID() == sitk.sitkFloat32
        assert label.GetPixelID() == sitk.sitkUInt8
        assert set(np.unique(lab)) <= set(LABELS_2022.values()) and (lab == LABELS_2022["GTVp"]).any()
        for attr in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
            assert np.allclose(getattr(ct, attr)(), getattr(label, attr)()), f"{case_id}: CT/label {attr}"
        assert np.allclose(ct.GetDirection(), np.eye(3).ravel()) and np.allclose(pet.GetDirection(), np.eye(3).ravel())
        sx, sy, sz = ct.GetSpacing()
        assert 0.9 <= sx == sy <= 1.1 and 2.0 <= sz <= 3.0
        assert pet.GetSpacing()[:2] == (4.0, 4.0) and 3.0 <= pet.GetSpacing()[2] <= 4.0
        shift = np.abs(np.subtract(pet.GetOrigin(), ct.GetOrigin()))
        assert (shift > 0.1).all() and not np.allclose(shift, np.round(shift)), f"{case_id}: PET origin {shift}"
        ct_lo, ct_hi = bounds(ct)
        pet_lo, pet_hi = bounds(pet)
        assert (pet_lo <= ct_lo).all() and (pet_hi >= ct_hi).all(), f"{case_id}: PET does not cover the CT"
        assert ct_arr.min() >= -1024 and (ct_arr < -900).any() and (ct_arr > 700).any(), "air and bone on CT"
        assert pet_arr.min() >= 0 and (pet_arr == 0).any()


def bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    size = np.array(image.GetSize())
    lo = image.TransformContinuousIndexToPhysicalPoint([-0.5] * 3)
    hi = image.TransformContinuousIndexToPhysicalPoint((size - 0.5).tolist())
    return np.array(lo), np.array(hi)


def test_centres_differ(phantom: tuple[Path, PhantomSummary]) -> None:
    """Per-centre domain shift: at least two CT slice thicknesses and PET slice spacings among the centres."""
    root, _ = phantom
    ct_z = {read(root / "imagesTr" / f"{c}-001__CT.nii.gz")[0].GetSpacing()[2] for c in TRAINING_CENTERS_2022}
    pet_z = {round(read(root / "imagesTr" / f"{c}-001__PT.nii.gz")[0].GetSpacing()[2], 2)
             for c in TRAINING_CENTERS_2022}
    assert len(ct_z) >= 2 and len(pet_z) >= 2


@pytest.fixture(scope="module")
def with_test_cases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PhantomSummary]:
    out = tmp_path_factory.mktemp("labelled") / "hecktor"
    return out, write_phantom(out, 1, size="small", seed=SEED, labelled_test_cases_per_center=5)


def test_labelled_test_cases(phantom: tuple[Path, PhantomSummary], with_test_cases: tuple[Path, PhantomSummary]
                             ) -> None:
    """Every training centre gets labelled test cases in imagesTs/ + labelsTs/ (ids 401...) with table rows; they
    leave the training cases byte-identical."""
    root, summary = with_test_cases
    test_ids = [f"{c}-{i:03d}" for c in TRAINING_CENTERS_2022 for i in range(401, 406)]
    assert summary.labelled_test_case_ids == tuple(test_ids) and summary.test_case_ids == ()
    assert {p.name for p in (root / "labelsTs").iterdir()} == {f"{i}.nii.gz" for i in test_ids}
    assert {p.name for p in (root / "imagesTs").iterdir()} == {f"{i}__{m}.nii.gz" for i in test_ids
                                                                for m in ("CT", "PT")}
    for case_id in test_ids[::5]:
        ct, lab = read(root / "imagesTs" / f"{case_id}__CT.nii.gz")[0], read(root / "labelsTs" / f"{case_id}.nii.gz")
        assert ct.GetSize() == lab[0].GetSize() and (lab[1] == LABELS_2022["GTVp"]).any()
    clinical = pd.read_csv(root / CLINICAL_CSV)
    assert list(clinical["PatientID"]) == [f"{c}-001" for c in TRAINING_CENTERS_2022] + test_ids
    assert list(pd.read_csv(root / ENDPOINT_CSV)["PatientID"]) == list(clinical["PatientID"])
    fixture_root, _ = phantom
    for name in ("imagesTr/HGJ-001__CT.nii.gz", "imagesTr/MDA-001__PT.nii.gz", "labelsTr/CHUM-001.nii.gz"):
        assert (root / name).read_bytes() == (fixture_root / name).read_bytes(), name
    assert "35 labelled test cases in imagesTs/ and labelsTs/" in str(summary)


def test_centre_shifts_in_the_written_files(with_test_cases: tuple[Path, PhantomSummary]) -> None:
    """HGJ (new dataset 1): contrast-enhanced CT (bright vessels and lesion rims) and a coarser, lower-calibrated PET;
    HMR (new dataset 2): a sharp, noisy CT kernel. The CT base's and adaptation's centres have neither."""
    stats = centre_statistics(with_test_cases[0])
    assert list(stats.index) == list(TRAINING_CENTERS_2022) and (stats["cases"] == 6).all()
    others = stats.drop(index=["HGJ", "HMR"])
    assert stats.loc["HGJ", "enhancing_pct"] > 2.0 and (others["enhancing_pct"] < 0.2).all(), stats
    assert stats.loc["HGJ", "gtvp_hu"] > others["gtvp_hu"].max() + 25, stats
    assert stats.loc["HMR", "ct_noise_hu"] > 1.4 * others["ct_noise_hu"].max(), stats
    assert stats.loc["HGJ", "pet_body_suv"] < 0.85 * others["pet_body_suv"].median(), stats
    assert stats.loc["HGJ", "pet_gtvp_suv_max"] < 0.8 * others["pet_gtvp_suv_max"].median(), stats


def test_centre_statistics_need_labelled_cases(tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match="has no labelled cases"):
        centre_statistics(tmp_path)


def test_determinism_and_stable_cases(phantom: tuple[Path, PhantomSummary], tmp_path: Path) -> None:
    """Same seed: byte-identical files, also when the other run has fewer cases; another seed: other images."""
    root, _ = phantom
    write_phantom(tmp_path / "same", 1, size="small", seed=SEED)
    write_phantom(tmp_path / "other", 1, size="small", seed=SEED + 1)
    for center in TRAINING_CENTERS_2022:
        for name in (f"imagesTr/{center}-001__CT.nii.gz", f"imagesTr/{center}-001__PT.nii.gz",
                     f"labelsTr/{center}-001.nii.gz"):
            assert (tmp_path / "same" / name).read_bytes() == (root / name).read_bytes(), name
            assert not np.array_equal(read(tmp_path / "other" / name)[1], read(root / name)[1]), name
    same = pd.read_csv(tmp_path / "same" / ENDPOINT_CSV)
    full = pd.read_csv(root / ENDPOINT_CSV).set_index("PatientID").loc[same["PatientID"]].reset_index()
    pd.testing.assert_frame_equal(same, full)


def test_gtvp_is_pet_avid_with_low_ct_contrast(phantom: tuple[Path, PhantomSummary]) -> None:
    """PET shows the GTVp far above background; CT hardly does (contrast-to-noise ratios against soft tissue). The
    two shifted new centres are outside this calibration on purpose: test_centre_shifts_in_the_written_files."""
    root, _ = phantom
    for case_id in training_ids():
        if case_id.split("-")[0] in CENTER_EFFECTS:
            continue
        ct, pet, lab, _ = case_arrays(root, case_id)
        gtvp = lab == LABELS_2022["GTVp"]
        soft = (ct > -50) & (ct < 150) & ~ndimage.binary_dilation(lab > 0, iterations=3)
        pet_bg, pet_noise = median_and_mad(pet[soft])
        ct_bg, ct_noise = median_and_mad(ct[soft])
        assert 0.5 <= pet_bg <= 1.5, f"{case_id}: background SUV {pet_bg}"
        assert pet[gtvp].mean() > 2.0 * pet_bg, f"{case_id}: GTVp SUV {pet[gtvp].mean()} vs background {pet_bg}"
        pet_cnr = (pet[gtvp].mean() - pet_bg) / pet_noise
        ct_cnr = (ct[gtvp].mean() - ct_bg) / ct_noise
        assert abs(ct[gtvp].mean() - ct_bg) < 50, f"{case_id}: GTVp HU {ct[gtvp].mean()} vs {ct_bg}"
        assert pet_cnr > 4 * max(abs(ct_cnr), 1.0), f"{case_id}: PET CNR {pet_cnr}, CT CNR {ct_cnr}"


def median_and_mad(values: np.ndarray) -> tuple[float, float]:
    median = float(np.median(values))
    return median, 1.4826 * float(np.median(np.abs(values - median)))


def test_physiological_hot_spots_outside_labels(phantom: tuple[Path, PhantomSummary]) -> None:
    """PET alone would give false positives: hot voxels well away from every label, at the brain (superior end)
    in every case, and in the neck below it (tonsils) in most cases."""
    root, _ = phantom
    neck_hot_spots = []
    for case_id in training_ids():
        ct, pet, lab, _ = case_arrays(root, case_id)
        far = ~ndimage.binary_dilation(lab > 0, iterations=5)
        assert (pet[far] > 4.0).sum() >= 10, case_id
        background = np.median(pet[far & (ct > -50) & (ct < 150)])
        below_brain = np.arange(lab.shape[0])[:, None, None] < 0.7 * lab.shape[0]
        neck_hot_spots.append(pet[far & below_brain].max() > 2.5 * background)
    assert np.mean(neck_hot_spots) >= 0.8, neck_hot_spots


def test_calibration_levels(phantom: tuple[Path, PhantomSummary]) -> None:
    """The documented difficulty structure, measured on the written files: GTVp a few HU above muscle on CT and
    hot on PET; nodes clearly denser than soft tissue; PET hot spots ("mimics") at the tumour's levels in most
    cases."""
    root, _ = phantom
    with_mimics, gtvp_ct_shift, node_ct_shift = 0, [], []
    for case_id in training_ids():
        model = case_model(case_id, case_id.split("-")[0], "small", SEED)
        ct, pet, lab, _ = case_arrays(root, case_id)
        gtvp = ndimage.binary_erosion(lab == LABELS_2022["GTVp"])  # away from the kernel's blur at the border
        gtvp_ct_shift.append(ct[gtvp].mean() - MUSCLE[0])
        assert GTVP_SUV[0] <= model.anatomy.gtvp_suv <= GTVP_SUV[1]
        nodes = ndimage.binary_erosion(lab == LABELS_2022["GTVn"])
        if nodes.sum() >= 5:
            node_ct_shift.append(ct[nodes].mean() - SOFT[0])
        with_mimics += bool(model.anatomy.mimics)
        assert all(MIMIC_SUV[0] <= v <= MIMIC_SUV[1] for v in model.anatomy.mimic_suv)
    assert with_mimics >= 0.6 * len(training_ids()), with_mimics
    assert GTVP_HU_ABOVE_MUSCLE[0] - 6 < np.mean(gtvp_ct_shift) < GTVP_HU_ABOVE_MUSCLE[1] + 6, gtvp_ct_shift
    assert np.mean(node_ct_shift) > 15, node_ct_shift


def test_mimics_are_hot_on_pet_and_absent_from_ct() -> None:
    """Rendering a case with and without its mimics: CT and label are identical, PET differs only inside them,
    with tumour-like uptake."""
    seen = 0
    for i in range(1, 9):
        model = case_model(f"HGJ-{i:03d}", "HGJ", "small", SEED)
        if not model.anatomy.mimics:
            continue
        seen += 1
        points = model.ct_grid.coordinates()
        hu, suv, label = _render(model.anatomy, *points)
        hu0, suv0, label0 = _render(dataclasses.replace(model.anatomy, mimics=(), mimic_suv=()), *points)
        assert np.array_equal(hu, hu0) and np.array_equal(label, label0)
        changed = suv != suv0
        assert changed.any() and not (changed & (label > 0)).any()
        assert np.isclose(suv[changed].min(), min(model.anatomy.mimic_suv), rtol=1e-6)
    assert seen >= 4


def test_some_cases_without_lymph_nodes(phantom: tuple[Path, PhantomSummary]) -> None:
    root, summary = phantom
    without = [i for i in training_ids()
               if not (read(root / "labelsTr" / f"{i}.nii.gz")[1] == LABELS_2022["GTVn"]).any()]
    assert 0 < len(without) < len(training_ids())
    assert tuple(without) == summary.cases_without_gtvn


def test_tables(phantom: tuple[Path, PhantomSummary]) -> None:
    root, _ = phantom
    clinical = pd.read_csv(root / CLINICAL_CSV)
    endpoint = pd.read_csv(root / ENDPOINT_CSV)
    assert tuple(clinical.columns) == CLINICAL_COLUMNS and tuple(endpoint.columns) == ENDPOINT_COLUMNS
    assert list(clinical["PatientID"]) == training_ids() == list(endpoint["PatientID"])
    assert set(endpoint["Relapse"]) == {0, 1} and (endpoint["RFS"] > 0).all()
    assert set(clinical["Gender"]) <= {"M", "F"} and clinical["Age"].between(18, 100).all()
    for column in ("Tobacco", "Alcohol", "HPV status (0=-, 1=+)", "Surgery", "Chemotherapy"):
        assert set(clinical[column].dropna()) <= {0, 1}, column
    assert clinical["CenterID"].nunique() == len(TRAINING_CENTERS_2022)


def test_survival_follows_tumour_volume(phantom: tuple[Path, PhantomSummary]) -> None:
    root, _ = phantom
    endpoint = pd.read_csv(root / ENDPOINT_CSV)
    volumes = []
    for case_id in endpoint["PatientID"]:
        label, lab = read(root / "labelsTr" / f"{case_id}.nii.gz")
        volumes.append((lab == LABELS_2022["GTVp"]).sum() * np.prod(label.GetSpacing()))
    c_index = concordance_index(endpoint["RFS"], -np.asarray(volumes), endpoint["Relapse"])
    assert c_index > 0.6


def test_risk_model_is_the_documented_one() -> None:
    """A Cox fit on 700 phantom records (the records `write_phantom` writes, without the images) recovers every
    documented coefficient: GTVp volume, GTVp SUV, nodes, HPV and age each move the risk, by about the amount the
    docstring of `_patient_record` says. The SUV is drawn independently of what CT shows (size, density)."""
    records = []
    for center in TRAINING_CENTERS_2022:
        for i in range(1, 101):
            case_id = f"{center}-{i:03d}"
            model = case_model(case_id, center, "small", SEED)
            _, _, label = _render(model.anatomy, *model.ct_grid.coordinates())  # as written to labelsTr/
            gtvp_ml = float((label == LABELS_2022["GTVp"]).sum()) * math.prod(model.ct_grid.spacing) / 1000.0
            row, outcome = _patient_record(model, gtvp_ml, SIZES["small"], _case_rngs(case_id, SEED)[3])
            hpv = row["HPV status (0=-, 1=+)"]
            records.append({"log_volume": math.log(gtvp_ml), "log_suv": math.log(model.anatomy.gtvp_suv),
                            "gtvp_hu": model.anatomy.gtvp_hu, "nodes": len(model.anatomy.nodes),
                            "hpv": np.nan if hpv is pd.NA else hpv, "age": row["Age"], "rfs": outcome["RFS"],
                            "relapse": outcome["Relapse"]})
    table = pd.DataFrame(records)
    assert abs(table["log_suv"].corr(table["log_volume"])) < 0.1 and abs(table["log_suv"].corr(table["gtvp_hu"])) < 0.1
    assert 0.3 < table["relapse"].mean() < 0.6
    # the table leaves 30 % of HPV blank, at random: the cases with it are an unbiased sample
    fit = CoxPHFitter().fit(table.drop(columns="gtvp_hu").dropna(), "rfs", "relapse").summary
    documented = {"log_volume": RISK_LOG_VOLUME, "log_suv": RISK_LOG_SUV, "nodes": RISK_PER_NODE,
                  "hpv": RISK_HPV_POSITIVE, "age": RISK_PER_YEAR_OVER_60}
    for name, coefficient in documented.items():
        low, high = fit.loc[name, "coef lower 95%"], fit.loc[name, "coef upper 95%"]
        assert low < coefficient < high and not low < 0 < high, (name, coefficient, low, high)


def test_demo_size_is_larger(tmp_path: Path) -> None:
    summary = write_phantom(tmp_path / "demo", 1, size="demo", seed=SEED)
    ct, _ = read(tmp_path / "demo" / "imagesTr" / f"{summary.case_ids[0]}__CT.nii.gz")
    label, lab = read(tmp_path / "demo" / "labelsTr" / f"{summary.case_ids[0]}.nii.gz")
    assert ct.GetSize()[:2] == (96, 96) and ct.GetSize()[2] >= 40
    assert (lab == LABELS_2022["GTVp"]).sum() * np.prod(label.GetSpacing()) > 1000.0  # > 1 mL


def test_hecktor_size_spans_the_head_and_neck_region() -> None:
    """The `hecktor` size (for timing) has HECKTOR's 200 x 200 x 310 mm region and an adult neck in it; checked on
    the model, without rendering."""
    for center in TRAINING_CENTERS_2022:
        case = case_model(f"{center}-001", center, size="hecktor", seed=SEED)
        extent = np.multiply(case.ct_grid.spacing, case.ct_grid.size)
        assert case.ct_grid.size[:2] == (200, 200) and 190 <= extent[0] <= 201 and 300 <= extent[2] <= 320
        assert 100 <= 2 * BODY[2] * case.anatomy.scale <= 140  # the neck's width in mm


@pytest.mark.parametrize("kwargs", [dict(cases_per_center=0), dict(cases_per_center=-2),
                                    dict(cases_per_center=2.5), dict(cases_per_center=1, size="huge"),
                                    dict(cases_per_center=1, test_cases_per_center=-1),
                                    dict(cases_per_center=1, labelled_test_cases_per_center=201),
                                    dict(cases_per_center=1, seed=-1),
                                    dict(cases_per_center=1, misalign=(-1.0, 2.0)),
                                    dict(cases_per_center=1, misalign=(5.0, 31.0)),
                                    dict(cases_per_center=1, misalign=(float("nan"), 2.0))])
def test_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    out = tmp_path / "out"
    with pytest.raises(InputDataError):
        write_phantom(out, **kwargs)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_refuses_existing_hecktor_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "imagesTr").mkdir(parents=True)
    marker = out / "imagesTr" / "CHUM-001__CT.nii.gz"
    marker.write_bytes(b"keep me")
    with pytest.raises(InputDataError, match="already holds HECKTOR files"):
        write_phantom(out, 1)
    assert marker.read_bytes() == b"keep me" and sorted(p.name for p in out.iterdir()) == ["imagesTr"]
    assert list(tmp_path.iterdir()) == [out]


def test_writes_into_existing_empty_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    write_phantom(out, 1)
    assert len(list((out / "labelsTr").iterdir())) == len(TRAINING_CENTERS_2022)
    assert list(tmp_path.iterdir()) == [out]


def test_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash in the middle of writing removes the partial output."""
    import nnunetv2_pemma.data.phantom as phantom_module

    calls = []

    def failing_write(image: sitk.Image, path: Path) -> None:
        calls.append(path)
        if len(calls) > 5:
            raise RuntimeError("disk full")
        sitk.WriteImage(image, str(path), useCompression=True)

    monkeypatch.setattr(phantom_module, "_write", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        write_phantom(tmp_path / "out", 1)
    assert list(tmp_path.iterdir()) == []
