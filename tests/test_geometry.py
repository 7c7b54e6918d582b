"""PET lands where it physically is, labels survive unchanged, crops restore exactly, the head box is on the head."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from hecktor_fixtures import (CT_SPACING, HOT_POINT, PET_ORIGIN, PET_SIZE, PET_SPACING, image, make_ct, make_pet,
                              voxel_centres_mm, write, write_hecktor_2022)
from nnunetv2_pemma.data.geometry import (bbox_mm_box, headneck_box, load_crop_records, nifti_header_problem,
                                          physical_bounds, restore_to_original)
from nnunetv2_pemma.data.hecktor import convert_hecktor
from nnunetv2_pemma.errors import InputDataError

FLIP_XY = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
FLIP_Z = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def _convert(root: Path, raw: Path, **kwargs) -> Path:
    report = convert_hecktor(root, dataset_id=501, name="Geo", raw_root=raw, **kwargs)
    return report.dataset_dir


def _flipped_pet_origin() -> tuple[float, float, float]:
    """Origin that makes a x/y-flipped PET grid cover the same physical box as the unflipped one."""
    far = [o + (n - 1) * s for o, n, s in zip(PET_ORIGIN, PET_SIZE, PET_SPACING)]
    return far[0], far[1], PET_ORIGIN[2]


@pytest.mark.parametrize("pet_direction", ["identity", "flipped_xy"])
@pytest.mark.parametrize("crop_size_mm", [(200.0, 200.0, 310.0), (30.0, 30.0, 26.0)])
def test_pet_hot_spot_lands_at_its_physical_point(tmp_path: Path, pet_direction: str,
                                                  crop_size_mm: tuple[float, float, float]) -> None:
    root = write_hecktor_2022(tmp_path / "in", ["CHUM-001"])
    if pet_direction == "flipped_xy":  # same physical PET, stored the other way round: voxel indexing would fail
        write(make_pet(origin=_flipped_pet_origin(), direction=FLIP_XY), root / "imagesTr" / "CHUM-001__PT.nii.gz")
    out = _convert(root, tmp_path / "raw", crop_size_mm=crop_size_mm)
    ct = sitk.ReadImage(str(out / "imagesTr" / "CHUM-001_0000.nii.gz"))
    pet = sitk.ReadImage(str(out / "imagesTr" / "CHUM-001_0001.nii.gz"))
    assert pet.GetPixelID() == sitk.sitkFloat32
    assert (pet.GetSize(), pet.GetSpacing(), pet.GetOrigin()) == (ct.GetSize(), ct.GetSpacing(), ct.GetOrigin())
    suv = sitk.GetArrayFromImage(pet)
    xyz = voxel_centres_mm(pet)
    hot = suv - 0.5 > 5.0  # above half the hot spot's peak
    centroid = (xyz[hot] * (suv[hot] - 0.5)[:, None]).sum(0) / (suv[hot] - 0.5).sum()
    argmax = xyz[np.unravel_index(np.argmax(suv), suv.shape)]
    assert np.linalg.norm(centroid - HOT_POINT) < CT_SPACING[0]  # within one CT voxel
    assert np.linalg.norm(argmax - HOT_POINT) < PET_SPACING[0]  # the peak is sampled on the 4 mm PET grid
    assert suv.max() == pytest.approx(10.5, abs=2.0)  # SUV kept, not normalised


def test_labels_are_bit_identical_without_crop(tmp_path: Path) -> None:
    root = write_hecktor_2022(tmp_path / "in", ["CHUM-001"])
    out = _convert(root, tmp_path / "raw", crop="none")
    for original, written in ((root / "labelsTr" / "CHUM-001.nii.gz", out / "labelsTr" / "CHUM-001.nii.gz"),
                              (root / "imagesTr" / "CHUM-001__CT.nii.gz", out / "imagesTr" / "CHUM-001_0000.nii.gz")):
        a, b = sitk.ReadImage(str(original)), sitk.ReadImage(str(written))
        assert a.GetPixelID() == b.GetPixelID()  # uint8 label, int16 CT
        assert (a.GetSize(), a.GetSpacing(), a.GetOrigin(), a.GetDirection()) == \
               (b.GetSize(), b.GetSpacing(), b.GetOrigin(), b.GetDirection())
        assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    record = load_crop_records(out)["CHUM-001"]
    assert record["crop_start"] == [0, 0, 0] and record["crop_size"] == list(make_ct().GetSize())


def test_crop_and_restore_round_trip_a_mask_exactly(tmp_path: Path) -> None:
    root = write_hecktor_2022(tmp_path / "in", ["CHUM-001"])
    out = _convert(root, tmp_path / "raw", crop_size_mm=(34.0, 34.0, 30.0))
    cropped = sitk.ReadImage(str(out / "labelsTr" / "CHUM-001.nii.gz"))
    assert cropped.GetSize() == (17, 17, 15)
    record = load_crop_records(out)["CHUM-001"]
    restored_path = tmp_path / "restored.nii.gz"
    restore_to_original(out / "labelsTr" / "CHUM-001.nii.gz", record, restored_path)
    original, restored = sitk.ReadImage(str(root / "labelsTr" / "CHUM-001.nii.gz")), sitk.ReadImage(str(restored_path))
    assert (restored.GetSize(), restored.GetSpacing(), restored.GetOrigin(), restored.GetDirection()) == \
           (original.GetSize(), original.GetSpacing(), original.GetOrigin(), original.GetDirection())
    assert np.array_equal(sitk.GetArrayFromImage(restored), sitk.GetArrayFromImage(original))


def test_restore_refuses_a_prediction_on_another_grid(tmp_path: Path) -> None:
    root = write_hecktor_2022(tmp_path / "in", ["CHUM-001"])
    out = _convert(root, tmp_path / "raw", crop_size_mm=(34.0, 34.0, 30.0))
    record = load_crop_records(out)["CHUM-001"]
    with pytest.raises(InputDataError, match="not on the cropped grid"):  # the uncropped label is not a crop
        restore_to_original(root / "labelsTr" / "CHUM-001.nii.gz", record, tmp_path / "restored.nii.gz")


def _body_phantom(direction: tuple[float, ...]) -> sitk.Image:
    """200x200x300 mm CT: shoulders, neck and a head whose vertex is 40 mm below the top, body off-centre in x."""
    size, spacing = (40, 40, 60), (5.0, 5.0, 5.0)
    origin = (-97.5, -97.5, 2.5) if direction[8] > 0 else (-97.5, -97.5, 297.5)
    ct = image(np.zeros((60, 40, 40), np.int16), spacing, origin, direction)
    xyz = voxel_centres_mm(ct)
    x, y, z = xyz[..., 0] - 30.0, xyz[..., 1], xyz[..., 2]  # body axis at x = +30 mm
    head = x ** 2 + y ** 2 + (z - 200.0) ** 2 < 55.0 ** 2  # vertex at z = 255 mm
    neck = (np.hypot(x, y) < 35.0) & (z > 100.0) & (z < 200.0)
    shoulders = (np.abs(x + 30.0) < 95.0) & (np.abs(y) < 60.0) & (z <= 100.0)  # centred on the image, not the head
    return image(np.where(head | neck | shoulders, 40, -1000).astype(np.int16), spacing, origin, direction)


@pytest.mark.parametrize("direction", [(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), FLIP_Z])
def test_headneck_box_hangs_from_the_head_top_and_centres_on_the_body(direction: tuple[float, ...]) -> None:
    ct = _body_phantom(direction)
    start, size = headneck_box(ct, (100.0, 100.0, 150.0))
    assert size == [20, 20, 30]
    lo, hi = physical_bounds(ct, (start, size))
    assert 245.0 <= hi[2] <= 257.5  # top of the box: within 10 mm of the vertex (z = 255 mm), not the image top
    assert lo[2] == pytest.approx(hi[2] - 150.0)
    assert (lo[0] + hi[0]) / 2 == pytest.approx(30.0, abs=2.5)  # centred on the head/neck, not the image or shoulders
    assert (lo[1] + hi[1]) / 2 == pytest.approx(0.0, abs=2.5)


def test_headneck_box_keeps_a_small_image_whole_below_the_head_top() -> None:
    ct = make_ct()  # 48 mm a side; the body stops 4 slices below the top (air above the head)
    assert headneck_box(ct, (200.0, 200.0, 310.0)) == ([0, 0, 0], [24, 24, 20])


def test_headneck_box_needs_a_body() -> None:
    air = image(np.full((8, 8, 8), -1000, np.int16), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    with pytest.raises(InputDataError, match="no body"):
        headneck_box(air, (200.0, 200.0, 310.0))


def test_bbox_mm_box_takes_voxels_whose_centres_are_inside() -> None:
    ct = make_ct()  # voxel centres at -23, -21, ..., 23 mm
    start, size = bbox_mm_box(ct, (-10.0, -20.0, 0.0), (10.0, 100.0, 5.0))
    assert start == [7, 2, 12] and size == [10, 22, 3]  # x: -9..9, y: -19..23 (clipped), z: 1..5 (edge included)
    with pytest.raises(InputDataError, match="does not overlap the CT"):
        bbox_mm_box(ct, (100.0, 100.0, 100.0), (150.0, 150.0, 150.0))


def _header(sform: np.ndarray | None, qform: np.ndarray | None) -> nib.Nifti1Header:
    """A header with the given affines (code 1 each; None: code 0); pixdim from the qform, else (2, 2, 2)."""
    header = nib.Nifti1Header()
    header.set_data_shape((8, 8, 8))
    header.set_zooms((2.0, 2.0, 2.0))
    if qform is not None:
        header.set_qform(qform, code=1)
    if sform is not None:
        header.set_sform(sform, code=1)
    return header


def _affine(scale: tuple[float, float, float] = (2.0, 2.0, 2.0), shear: float = 0.0) -> np.ndarray:
    affine = np.diag([*scale, 1.0])
    affine[0, 1] = shear
    affine[:3, 3] = (-7.0, -7.0, -7.0)
    return affine


def test_nifti_header_accepts_sform_and_qform_equal_up_to_float32() -> None:
    header = _header(_affine(), _affine())
    header.set_sform(header.get_sform() + 3e-6, code=1)  # ~10 float32 steps at these magnitudes
    assert nifti_header_problem((2.0, 2.0, 2.0), header, np.eye(3).ravel()) is None


def test_nifti_header_with_sform_only_must_match_its_pixdim() -> None:
    """SimpleITK takes voxel sizes from pixdim, nibabel from the sform: a lone sform must agree with the pixdim."""
    header = _header(_affine(scale=(2.0, 2.0, 3.0)), None)
    assert nifti_header_problem((2.0, 2.0, 2.0), header, np.eye(3).ravel()) == (
        "has an sform with voxel sizes (2, 2, 3) mm but pixdim (2, 2, 2) mm (SimpleITK takes the pixdim, nibabel the "
        "sform)")
    assert nifti_header_problem((2.0, 2.0, 3.0), header, np.eye(3).ravel()) is None


def test_nifti_header_problems_of_the_axes() -> None:
    flat = _affine()
    flat[:3, 2] = 0.0
    assert nifti_header_problem((2.0, 2.0, 2.0), _header(flat, None), np.eye(3).ravel()) == \
        "has an sform whose axis 2 has length 0"
    assert nifti_header_problem((2.0, 2.0, 2.0), _header(_affine(shear=2.0), None), np.eye(3).ravel()) == \
        "has an sform whose axes 0 and 1 are not perpendicular (45.0 degrees apart, not 90)"
    skew = np.eye(3)
    skew[0, 1] = 0.1
    assert nifti_header_problem((2.0, 2.0, 2.0), _header(None, _affine()), skew.ravel()) == \
        "has a direction matrix (as SimpleITK reads it) whose axis 1 has length 1.00499"
    assert nifti_header_problem((2.0, np.nan, 2.0), _header(None, _affine()), np.eye(3).ravel()).startswith(
        "has voxel sizes (pixdim) (2, nan, 2) mm in its header")

