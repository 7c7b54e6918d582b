"""Image geometry for the HECKTOR conversion: PET->CT resampling, the head-and-neck box, crop records, restore.

Everything goes through physical coordinates (SimpleITK's index <-> point transforms), never through voxel indices
of two different images, because HECKTOR's PET (4 mm) and CT (~1 mm) grids have different origins, extents and
sometimes directions.

A NIfTI header is checked before its grid is trusted (`nifti_header_problem`): SimpleITK, which the conversion and
nnU-Net read with, takes a zero voxel size for 1 mm and a negative one for a mirrored axis without a word, and picks
the sform or the qform by their codes while nibabel always prefers the sform.

A crop record (one per case, stored in the raw dataset's `pemma_crops.json`) is what it takes to put a prediction
made on the cropped grid back into the original CT grid:
`{"split": "train"|"test", "original": {"size", "spacing", "origin", "direction"}, "crop_start": [i, j, k],
"crop_size": [ni, nj, nk]}`, in SimpleITK index order (x, y, z). With `--crop none` the crop is the whole image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from nnunetv2_pemma.errors import InputDataError

CROPS_FILE = "pemma_crops.json"
BODY_HU = -500.0
# A slice is part of the head once it holds this much body (20 cm^2, a slice just below the skull vertex; smaller
# slices are noise, a headrest or the very vertex)...
HEAD_AREA_MM2 = 2000.0
# ...or half the largest body slice, so that tiny phantoms still get a head top.
HEAD_AREA_FRACTION = 0.5
# Label and CT headers may differ by float32 rounding; anything this small is the same grid.
GEOMETRY_TOL_MM = 1e-2
DIRECTION_TOL = 1e-4

Box = tuple[list[int], list[int]]  # (start index, size), SimpleITK index order


def geometry_of(image: sitk.Image) -> dict:
    """The grid of an image as JSON-ready lists (exact float round-trip through json)."""
    return {"size": list(image.GetSize()), "spacing": list(image.GetSpacing()), "origin": list(image.GetOrigin()),
            "direction": list(image.GetDirection())}


def geometry_mismatch(image: sitk.Image, reference: sitk.Image) -> str | None:
    """Describe how `image`'s grid differs from `reference`'s beyond header rounding, or None if it is the same."""
    if image.GetSize() != reference.GetSize():
        return f"size {image.GetSize()} != {reference.GetSize()}"
    for what, tol in (("spacing", GEOMETRY_TOL_MM), ("origin", GEOMETRY_TOL_MM), ("direction", DIRECTION_TOL)):
        a, b = getattr(image, f"Get{what.capitalize()}")(), getattr(reference, f"Get{what.capitalize()}")()
        if not np.allclose(a, b, rtol=0, atol=tol):
            return f"{what} {_fmt(a)} != {_fmt(b)}"
    return None


def nifti_header_problem(written_pixdim: Sequence[float], header: nib.Nifti1Header,
                         direction: Sequence[float]) -> str | None:
    """Say why a NIfTI header's grid cannot be trusted, or None.

    `written_pixdim`: the three spatial voxel sizes as stored (nibabel repairs them when it loads a header);
    `header`: the header as nibabel loads it; `direction`: SimpleITK's direction of the image.
    """
    pixdim = np.asarray(written_pixdim, float)
    if not np.all(np.isfinite(pixdim) & (pixdim > 0)):
        return (f"has voxel sizes (pixdim) {_fmt(pixdim)} mm in its header; they must be finite and positive "
                f"(SimpleITK reads 0 as 1 mm and mirrors an axis whose size is negative)")
    axes = _axes_problem(np.reshape(np.asarray(direction, float), (3, 3)), unit=True)
    if axes is not None:
        return f"has a direction matrix (as SimpleITK reads it) whose {axes}"
    if header["sform_code"] <= 0:  # SimpleITK and nibabel both use the qform (checked by the voxel sizes)
        return None
    sform = header.get_sform()
    axes = _axes_problem(sform[:3, :3], unit=False)
    if axes is not None:
        return f"has an sform whose {axes}"
    if header["qform_code"] > 0:
        mismatch = affine_mismatch(sform, header.get_qform())
        return None if mismatch is None else f"has an sform and a qform that disagree (sform != qform): {mismatch}"
    sizes = np.linalg.norm(sform[:3, :3], axis=0)
    if not np.allclose(sizes, pixdim, rtol=0, atol=GEOMETRY_TOL_MM):
        return (f"has an sform with voxel sizes {_fmt(sizes)} mm but pixdim {_fmt(pixdim)} mm (SimpleITK takes the "
                f"pixdim, nibabel the sform)")
    return None


def affine_mismatch(a: np.ndarray, b: np.ndarray) -> str | None:
    """How two voxel-to-world affines differ beyond header rounding (origin, voxel sizes, axis directions), or None."""
    sizes_a, sizes_b = np.linalg.norm(a[:3, :3], axis=0), np.linalg.norm(b[:3, :3], axis=0)
    for what, x, y, tol in (("origin", a[:3, 3], b[:3, 3], GEOMETRY_TOL_MM),
                            ("voxel sizes", sizes_a, sizes_b, GEOMETRY_TOL_MM),
                            ("direction", (a[:3, :3] / sizes_a).ravel(), (b[:3, :3] / sizes_b).ravel(), DIRECTION_TOL)):
        if not np.allclose(x, y, rtol=0, atol=tol):
            return f"{what} {_fmt(x)} != {_fmt(y)}"
    return None


def _axes_problem(matrix: np.ndarray, unit: bool) -> str | None:
    """Say which columns of a 3x3 matrix are not perpendicular axes of non-zero (`unit`: of unit) length, or None."""
    lengths = np.linalg.norm(matrix, axis=0)
    bad = ~np.isfinite(lengths) | (lengths <= 0) | (unit & (np.abs(lengths - 1) > DIRECTION_TOL))
    if bad.any():
        a = int(np.flatnonzero(bad)[0])
        return f"axis {a} has length {lengths[a]:.6g}"
    cosines = np.abs((matrix / lengths).T @ (matrix / lengths))
    i, j = max(((0, 1), (0, 2), (1, 2)), key=lambda pair: cosines[pair])
    if cosines[i, j] <= DIRECTION_TOL:
        return None
    angle = np.degrees(np.arccos(min(cosines[i, j], 1.0)))
    return f"axes {i} and {j} are not perpendicular ({angle:.1f} degrees apart, not 90)"


def physical_bounds(image: sitk.Image, box: Box | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned physical extent (voxel edges, mm) of the whole image or of a box of its voxels."""
    start, size = box if box is not None else ([0, 0, 0], list(image.GetSize()))
    lo = np.asarray(start, float) - 0.5
    hi = lo + np.asarray(size, float)
    corners = [image.TransformContinuousIndexToPhysicalPoint([(lo, hi)[(c >> a) & 1][a] for a in range(3)])
               for c in range(8)]
    return np.min(corners, axis=0), np.max(corners, axis=0)


def overlap_problem(moving: sitk.Image, reference: sitk.Image, box: Box) -> str | None:
    """Say so when `moving` does not overlap `box` of `reference` in physical space (resampling would give zeros)."""
    lo_m, hi_m = physical_bounds(moving)
    lo_r, hi_r = physical_bounds(reference, box)
    if np.all(lo_m < hi_r) and np.all(lo_r < hi_m):
        return None
    return (f"does not overlap the CT output region in physical space (it spans {_fmt(lo_m)}..{_fmt(hi_m)} mm, "
            f"the CT region {_fmt(lo_r)}..{_fmt(hi_r)} mm)")


def _index_axis_to_physical(image: sitk.Image) -> list[int]:
    """For each index axis, the physical axis (0=x, 1=y, 2=z) it runs along most closely."""
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    return [int(np.argmax(np.abs(d[:, a]))) for a in range(3)]


def headneck_box(ct: sitk.Image, crop_size_mm: Sequence[float]) -> Box:
    """Fixed-size box (mm, physical x/y/z) from the top of the head down, centred in-plane on the body.

    Body = CT > -500 HU. The head top is the physically most superior slice (largest z, the same in LPS and RAS)
    with enough body in it; the box spans crop_size_mm[2] below it and is centred in-plane on the centroid of the
    body voxels in that slab. The box is clipped to the image, so an image smaller than the box is kept whole from
    the head top down. Known limit: a scanner table reaching above the head passes for body and moves the box up.
    """
    body = sitk.GetArrayViewFromImage(ct) > BODY_HU  # numpy axes are index axes reversed
    phys_of = _index_axis_to_physical(ct)
    spacing = np.asarray(ct.GetSpacing())
    size = ct.GetSize()
    z_axis = phys_of.index(2) if 2 in phys_of else 2
    in_plane = [a for a in range(3) if a != z_axis]
    counts = body.sum(axis=tuple(2 - a for a in in_plane))
    if counts.max() == 0:
        raise InputDataError(f"no body in the CT (no voxel above {BODY_HU:g} HU) to place the head-and-neck box")
    area = counts * float(np.prod(spacing[in_plane]))
    head_slices = np.flatnonzero(area >= min(HEAD_AREA_MM2, HEAD_AREA_FRACTION * area.max()))
    superior_up = ct.GetDirection()[3 * 2 + z_axis] > 0  # does physical z grow with this index?
    n = [max(1, int(round(crop_size_mm[phys_of[a]] / spacing[a]))) for a in range(3)]
    start, stop = [0, 0, 0], [0, 0, 0]
    if superior_up:
        stop[z_axis] = int(head_slices.max()) + 1
        start[z_axis] = stop[z_axis] - n[z_axis]
    else:
        start[z_axis] = int(head_slices.min())
        stop[z_axis] = start[z_axis] + n[z_axis]
    slab = [slice(None)] * 3
    slab[2 - z_axis] = slice(max(0, start[z_axis]), min(size[z_axis], stop[z_axis]))
    body_slab = body[tuple(slab)]
    for a in in_plane:  # centroid from the body's projection on each in-plane axis (no per-voxel coordinates)
        profile = body_slab.sum(axis=tuple(ax for ax in range(3) if ax != 2 - a))
        centroid = float(np.dot(np.arange(profile.size), profile) / profile.sum())
        start[a] = int(round(centroid - (n[a] - 1) / 2))
        stop[a] = start[a] + n[a]
    start = [max(0, s) for s in start]
    stop = [min(sz, e) for sz, e in zip(size, stop)]
    return start, [e - s for s, e in zip(start, stop)]


def bbox_mm_box(ct: sitk.Image, lo_mm: Sequence[float], hi_mm: Sequence[float]) -> Box:
    """CT voxels whose centres lie inside a physical box (HECKTOR 2021 bbox CSV, mm), clipped to the image."""
    corners = [ct.TransformPhysicalPointToContinuousIndex([float((lo_mm, hi_mm)[(c >> a) & 1][a]) for a in range(3)])
               for c in range(8)]
    lo, hi = np.min(corners, axis=0), np.max(corners, axis=0)
    start = [max(0, int(np.ceil(v - 1e-3))) for v in lo]
    stop = [min(sz, int(np.floor(v + 1e-3)) + 1) for sz, v in zip(ct.GetSize(), hi)]
    if any(e <= s for s, e in zip(start, stop)):
        raise InputDataError(f"bounding box {_fmt(lo_mm)}..{_fmt(hi_mm)} mm does not overlap the CT "
                             f"(CT spans {'..'.join(_fmt(b) for b in physical_bounds(ct))} mm)")
    return start, [e - s for s, e in zip(start, stop)]


def crop_record(ct: sitk.Image, box: Box, split: str) -> dict:
    """The record that `crop` applies and `restore_to_original` undoes."""
    return {"split": split, "original": geometry_of(ct), "crop_start": list(box[0]), "crop_size": list(box[1])}


def crop(image: sitk.Image, record: dict) -> sitk.Image:
    """Cut the record's box out of an image on the original CT grid; the origin moves, nothing is resampled."""
    if list(record["crop_size"]) == list(image.GetSize()):
        return image
    return sitk.RegionOfInterest(image, [int(v) for v in record["crop_size"]], [int(v) for v in record["crop_start"]])


def resample_pet_to(pet: sitk.Image, reference: sitk.Image, transform: sitk.Transform | None = None) -> sitk.Image:
    """PET (SUV) onto the CT grid through physical space (and `transform`, CT points -> PET points, when the PET was
    registered); outside the PET field of view is 0 SUV."""
    return sitk.Resample(pet, reference, transform or sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def _grid_from_record(original: dict) -> sitk.Image:
    """An empty image carrying the original CT grid, for point transforms."""
    grid = sitk.Image([int(v) for v in original["size"]], sitk.sitkUInt8)
    grid.SetSpacing(original["spacing"])
    grid.SetOrigin(original["origin"])
    grid.SetDirection(original["direction"])
    return grid


def restore_to_original(pred_path: Path, record: dict, out_path: Path) -> None:
    """Put a prediction made on the cropped grid back into the original CT grid, background (0) outside the box.

    The prediction must sit on the cropped grid (size, spacing, origin, direction); the output has exactly the
    original CT geometry, so it can be compared with the uncropped HECKTOR label.
    """
    pred_path, out_path = Path(pred_path), Path(out_path)
    try:
        pred = sitk.ReadImage(str(pred_path))
    except RuntimeError as e:
        raise InputDataError(f"cannot read prediction {pred_path}: {sitk_error_reason(e)}") from None
    grid = _grid_from_record(record["original"])
    expected = sitk.RegionOfInterest(grid, [int(v) for v in record["crop_size"]],
                                     [int(v) for v in record["crop_start"]])
    problem = geometry_mismatch(pred, expected)
    if problem is not None:
        raise InputDataError(f"prediction {pred_path} is not on the cropped grid of its crop record: {problem}")
    array = sitk.GetArrayFromImage(pred)
    full = np.zeros(tuple(reversed(record["original"]["size"])), dtype=array.dtype)
    (i, j, k), (ni, nj, nk) = record["crop_start"], record["crop_size"]
    full[k:k + nk, j:j + nj, i:i + ni] = array
    out = sitk.GetImageFromArray(full)
    out.CopyInformation(grid)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(out, str(out_path), useCompression=True)


def load_crop_records(dataset_dir: Path) -> dict[str, dict]:
    """Crop records of a converted raw dataset, by case id."""
    path = Path(dataset_dir) / CROPS_FILE
    if not path.is_file():
        raise InputDataError(f"no {CROPS_FILE} in {dataset_dir}: not a dataset written by `pemma convert-hecktor`")
    return json.loads(path.read_text())


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):.3g}" for v in values) + ")"


def sitk_error_reason(error: Exception) -> str:
    """The useful part of a SimpleITK exception: its last non-empty line (the rest is a C++ location)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return lines[-1] if lines else type(error).__name__
