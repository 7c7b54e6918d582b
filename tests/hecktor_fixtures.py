"""Tiny synthetic HECKTOR-layout cases written with SimpleITK, for the conversion tests.

A case is a CT (int16 HU, 2 mm grid, a body cylinder with air above the head), a PET on its own 4 mm grid with a
different origin (SUV, a Gaussian hot spot at a chosen physical point) and a label on the CT grid (a GTVp block
and a GTVn block). Everything is small (24^3 CT voxels) so that the tests stay fast on two cores.

Damaged files are made from real ones: `truncate` keeps the first half of a file's bytes, `patch_header` rewrites
header fields (pixdim, sform, qform, codes) exactly as given, which nibabel's image writer would not do.
"""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path
from typing import Iterable, Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk

CT_SIZE = (24, 24, 24)
CT_SPACING = (2.0, 2.0, 2.0)
CT_ORIGIN = (-23.0, -23.0, -23.0)  # voxel centres from -23 to +23 mm
PET_SIZE = (16, 16, 16)
PET_SPACING = (4.0, 4.0, 4.0)
PET_ORIGIN = (-31.3, -29.7, -33.1)  # 4 mm grid, off the CT grid, covering it
HOT_POINT = (5.3, -6.1, 3.7)  # mm, where the PET hot spot is centred
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def image(array: np.ndarray, spacing: Sequence[float], origin: Sequence[float],
          direction: Sequence[float] = IDENTITY) -> sitk.Image:
    """A SimpleITK image from a (z, y, x) array and its geometry."""
    img = sitk.GetImageFromArray(array)
    img.SetSpacing([float(v) for v in spacing])
    img.SetOrigin([float(v) for v in origin])
    img.SetDirection([float(v) for v in direction])
    return img


def voxel_centres_mm(img: sitk.Image) -> np.ndarray:
    """Physical coordinates of every voxel centre, shape (z, y, x, 3)."""
    size = img.GetSize()
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), axis=-1)  # (x, y, z, 3)
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    phys = np.asarray(img.GetOrigin()) + (idx * np.asarray(img.GetSpacing())) @ d.T
    return phys.transpose(2, 1, 0, 3)


def make_ct(size: Sequence[int] = CT_SIZE, spacing: Sequence[float] = CT_SPACING,
            origin: Sequence[float] = CT_ORIGIN, direction: Sequence[float] = IDENTITY) -> sitk.Image:
    """Body cylinder (40 HU) along z in air (-1000 HU), ending a few slices below the physical top of the image."""
    ct = image(np.zeros(tuple(reversed(size)), np.int16), spacing, origin, direction)
    xyz = voxel_centres_mm(ct)
    top = xyz[..., 2].max() - 3 * spacing[2]
    body = (np.hypot(xyz[..., 0], xyz[..., 1]) < 0.35 * size[0] * spacing[0]) & (xyz[..., 2] < top)
    return image(np.where(body, 40, -1000).astype(np.int16), spacing, origin, direction)


def make_pet(hot_point: Sequence[float] = HOT_POINT, size: Sequence[int] = PET_SIZE,
             spacing: Sequence[float] = PET_SPACING, origin: Sequence[float] = PET_ORIGIN,
             direction: Sequence[float] = IDENTITY, sigma_mm: float = 4.0) -> sitk.Image:
    """SUV 0.5 background plus a Gaussian hot spot (peak +10 SUV) centred at a physical point."""
    pet = image(np.zeros(tuple(reversed(size)), np.float32), spacing, origin, direction)
    d2 = ((voxel_centres_mm(pet) - np.asarray(hot_point)) ** 2).sum(-1)
    return image((0.5 + 10.0 * np.exp(-d2 / (2 * sigma_mm ** 2))).astype(np.float32), spacing, origin, direction)


def make_label(ct: sitk.Image, gtvn: bool = True) -> sitk.Image:
    """GTVp (1) block and, for 2022, a GTVn (2) block, on the CT grid."""
    arr = np.zeros(tuple(reversed(ct.GetSize())), np.uint8)
    arr[8:13, 9:14, 10:15] = 1
    if gtvn:
        arr[14:17, 6:9, 6:9] = 2
    label = sitk.GetImageFromArray(arr)
    label.CopyInformation(ct)
    return label


def write(img: sitk.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), useCompression=True)
    return path


def write_case_2022(root: Path, case_id: str, test: bool = False, label_name: str | None = None) -> None:
    """One HECKTOR 2022 case: imagesTr (or imagesTs) CT + PT, and labelsTr/<case>.nii.gz for training cases."""
    ct = make_ct()
    images = root / ("imagesTs" if test else "imagesTr")
    write(ct, images / f"{case_id}__CT.nii.gz")
    write(make_pet(), images / f"{case_id}__PT.nii.gz")
    if not test:
        write(make_label(ct), root / "labelsTr" / f"{label_name or case_id}.nii.gz")


def write_hecktor_2022(root: Path, cases: Iterable[str], test_cases: Iterable[str] = ()) -> Path:
    for case_id in cases:
        write_case_2022(root, case_id)
    for case_id in test_cases:
        write_case_2022(root, case_id, test=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    return root


def write_hecktor_2021(root: Path, cases: Iterable[str], box_mm: tuple[Sequence[float], Sequence[float]],
                       csv_name: str = "hecktor2021_bbox_training.csv") -> Path:
    """Flat HECKTOR 2021 folder (<ID>_ct/_pt/_gtvt) and a bbox CSV giving every case the same physical box."""
    root.mkdir(parents=True, exist_ok=True)
    (lo, hi) = box_mm
    with (root / csv_name).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["PatientID", "x1", "x2", "y1", "y2", "z1", "z2"])
        for case_id in cases:
            ct = make_ct()
            write(ct, root / f"{case_id}_ct.nii.gz")
            write(make_pet(), root / f"{case_id}_pt.nii.gz")
            write(make_label(ct, gtvn=False), root / f"{case_id}_gtvt.nii.gz")
            writer.writerow([case_id, lo[0], hi[0], lo[1], hi[1], lo[2], hi[2]])
    return root


def truncate(path: Path) -> Path:
    """Keep the first half of the file's bytes, as an interrupted copy or download does."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def read_header(path: Path) -> nib.Nifti1Header:
    """The NIfTI-1 header exactly as stored (no repairs)."""
    raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    return nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)


def patch_header(path: Path, sform: tuple[np.ndarray, int] | None = None, qform: tuple[np.ndarray, int] | None = None,
                 pixdim: Sequence[float] | None = None, **fields: float) -> Path:
    """Rewrite header fields of a NIfTI-1 file in place, voxels untouched: sform/qform as (affine, code) (set_qform
    also sets pixdim from the affine, so `pixdim`, the three spatial voxel sizes, is applied last), other fields by
    name (sform_code=0, ...)."""
    raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)
    if sform is not None:
        header.set_sform(sform[0], code=sform[1])
    if qform is not None:
        header.set_qform(qform[0], code=qform[1])
    for name, value in fields.items():
        header[name] = value
    if pixdim is not None:
        header["pixdim"][1:4] = pixdim
    patched = header.binaryblock + raw[len(header.binaryblock):]
    path.write_bytes(gzip.compress(patched) if path.name.endswith(".gz") else patched)
    return path
