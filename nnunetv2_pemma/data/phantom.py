"""Synthetic head-and-neck PET/CT cases in the HECKTOR 2022 layout (a "phantom").

HECKTOR cannot be downloaded here, yet conversion, nnU-Net planning, training and the survival analysis need data with
HECKTOR's files and its pitfalls: PET on its own coarser grid with another origin, scanner differences between
centres, PET hot spots that are not tumour, and tumours that are faint on CT. Every structure is an analytic shape in
physical coordinates (mm); CT, PET and label are samplings of that one model, so they line up physically whatever the
grids.

Coordinates are ITK's (LPS, identity direction): +x is the patient's left, +y posterior, +z superior (the head end).

Centres differ as HECKTOR's do (`CENTER_PROFILES`): CT and PET scanners, reconstruction kernels and noise, SUV
calibration; one new centre images with contrast-enhanced CT and an older PET (`CENTER_EFFECTS`, README "The
phantom").

Labelled test cases (`labelled_test_cases_per_center`) go to imagesTs/ with their labels in labelsTs/, as HECKTOR's
released test set: the converter keeps them out of every cross-validation split, and `pemma reproduce` scores them.

With `misalign=(MM, DEG)` the patient moves between the CT and the PET: each case's PET shows the anatomy after a
rigid motion of exactly MM mm and DEG degrees in random directions (the truth is written to MISALIGNMENT_FILE), so
that the registration's accuracy can be measured. CT, labels and tables stay byte-identical to the aligned phantom.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

from nnunetv2_pemma.data.centers import LABELS_2022, TEST_CENTERS_2022, TRAINING_CENTERS_2022
from nnunetv2_pemma.errors import InputDataError

CLINICAL_CSV = "hecktor2022_clinical_info_training.csv"
ENDPOINT_CSV = "hecktor2022_endpoint_training.csv"
CLINICAL_COLUMNS: tuple[str, ...] = ("PatientID", "Task 1", "Task 2", "CenterID", "Gender", "Age", "Weight", "Tobacco",
                                     "Alcohol", "Performance status", "HPV status (0=-, 1=+)", "Surgery",
                                     "Chemotherapy")
ENDPOINT_COLUMNS: tuple[str, ...] = ("PatientID", "Relapse", "RFS")
MISALIGNMENT_FILE = "phantom_misalignment.json"
HECKTOR_ENTRIES: tuple[str, ...] = ("imagesTr", "labelsTr", "imagesTs", "labelsTs", CLINICAL_CSV, ENDPOINT_CSV,
                                    MISALIGNMENT_FILE)

MAX_CASES_PER_CENTER = 200
# Test ids of a centre that also has training cases (MDA) start here, so the two never share an id (or a seed).
TEST_ID_OFFSET = 200
# Labelled test cases of every training centre: ids from here on (after every unlabelled test id).
LABELLED_TEST_ID_OFFSET = 400
# The phantom's own numeric centre codes for the CenterID column.
CENTER_IDS: dict[str, int] = {c: i for i, c in enumerate(dict.fromkeys(TRAINING_CENTERS_2022 + TEST_CENTERS_2022), 1)}

PET_PIXEL_MM = 4.0
PET_MARGIN_MM = 6.0  # PET reaches this far beyond the CT field of view on every side
MAX_MISALIGN_MM, MAX_MISALIGN_DEG = 50.0, 30.0  # beyond any patient motion on a PET/CT bed
PET_SUPERSAMPLE = 3  # samples per PET voxel and axis: partial-volume activity at sub-voxel accuracy
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


@dataclass(frozen=True)
class CenterProfile:
    """Scanner settings of one centre: the domain shift between centres."""

    ct_pixel_mm: float  # CT in-plane spacing
    ct_slice_mm: float  # CT slice spacing
    ct_noise_hu: float  # standard deviation of CT noise after the reconstruction kernel
    ct_kernel_mm: float  # in-plane Gaussian sigma of the reconstruction kernel (larger = softer)
    pet_slice_mm: float  # PET slice spacing (in-plane is always PET_PIXEL_MM)
    pet_fwhm_mm: float  # PET point-spread function
    pet_counts_per_suv: float  # Poisson counts per voxel for SUV 1 (lower = noisier)
    suv_scale: float  # calibration factor of the SUV values
    ct_contrast_hu: float = 0.0  # iodine contrast: arterial enhancement in HU (0 = non-contrast CT); see _render


CENTER_PROFILES: dict[str, CenterProfile] = {
    "CHUM": CenterProfile(0.98, 3.0, 12.0, 0.6, 4.00, 6.0, 40.0, 1.00),
    "CHUP": CenterProfile(1.00, 2.0, 18.0, 0.3, 4.00, 5.0, 30.0, 1.08),
    "CHUS": CenterProfile(0.98, 3.0, 10.0, 0.8, 3.27, 7.0, 50.0, 0.95),
    "CHUV": CenterProfile(1.00, 2.0, 15.0, 0.5, 3.27, 5.5, 35.0, 1.05),
    # new dataset 1: contrast-enhanced CT; an older PET without resolution recovery (coarser), calibrated lower
    "HGJ": CenterProfile(0.98, 3.0, 20.0, 0.4, 3.27, 9.0, 25.0, 0.80, ct_contrast_hu=160.0),
    # new dataset 2: a sharp CT kernel with high noise
    "HMR": CenterProfile(1.00, 2.5, 32.0, 0.15, 3.27, 7.5, 45.0, 1.10),
    "MDA": CenterProfile(0.98, 2.5, 16.0, 0.5, 4.00, 6.0, 35.0, 0.97),
    "USZ": CenterProfile(0.98, 2.0, 11.0, 0.6, 3.00, 5.0, 45.0, 1.12),
    "CHB": CenterProfile(1.00, 2.5, 17.0, 0.4, 4.00, 6.5, 30.0, 0.90),
}


# The new centres' shifts beyond scanner noise and spacing, which a CT model trained at the other centres has not
# seen (README "The phantom": why these).
CENTER_EFFECTS: dict[str, str] = {
    "HGJ": "contrast-enhanced CT (arteries +160 HU, lesion rims +56 HU); older PET: 9 mm FWHM, SUV calibration x0.80",
    "HMR": "sharp CT kernel (0.15 mm) with high noise (32 HU)",
}


@dataclass(frozen=True)
class PhantomSize:
    """Grid and anatomy size: the anatomy (in mm) scales with the in-plane field of view."""

    ct_xy_voxels: int
    z_fov_mm: float
    anatomy_scale: float  # 1.0 = a 48 mm wide field of view
    gtvp_radius_mm: tuple[float, float]
    node_radius_mm: tuple[float, float]


SIZES: dict[str, PhantomSize] = {
    "small": PhantomSize(48, 72.0, 1.0, (5.0, 9.0), (3.0, 5.0)),
    "demo": PhantomSize(96, 120.0, 2.0, (8.0, 14.0), (4.5, 7.5)),
    # HECKTOR's head-and-neck region (200 x 200 x 310 mm) around an adult neck: for timing, not for training.
    "hecktor": PhantomSize(200, 310.0, 3.0, (10.0, 18.0), (5.0, 9.0)),
}

# Tissues as (HU, SUV). SUV 0 in air; brain, tonsil, vocal-cord and lesion uptake are drawn per case.
AIR = (-1000.0, 0.0)
SOFT = (40.0, 1.0)
FAT = (-100.0, 0.4)
MUSCLE = (50.0, 0.9)
CORTICAL = (1000.0, 0.6)
CANCELLOUS = (700.0, 0.9)
DISC = (80.0, 0.8)
CORD = (35.0, 0.6)
BLOOD = (45.0, 1.0)  # unenhanced blood; on PET like the soft tissue around it
BRAIN_HU = 35.0
HU_RANGE = (-1024, 3071)


@dataclass(frozen=True)
class Grid:
    """An image grid with identity direction; vectors are (x, y, z) like SimpleITK's."""

    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    size: tuple[int, int, int]

    def coordinates(self, supersample: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Physical x, y, z of the voxel centres (or of `supersample`^3 sub-voxel centres per voxel), as arrays in
        z, y, x order like SimpleITK's."""
        offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
        axes = [o + s * (np.arange(n)[:, None] + offsets[None, :]).ravel()
                for o, s, n in zip(self.origin, self.spacing, self.size)]
        z, y, x = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
        return x, y, z

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper physical corners of the field of view (voxel edges, not centres)."""
        origin, spacing = np.asarray(self.origin), np.asarray(self.spacing)
        return origin - spacing / 2, origin + spacing * (np.asarray(self.size) - 0.5)

    def image(self, array: np.ndarray) -> sitk.Image:
        """SimpleITK image of a z, y, x array on this grid."""
        img = sitk.GetImageFromArray(array)
        img.SetOrigin(self.origin)
        img.SetSpacing(self.spacing)
        return img


@dataclass(frozen=True)
class Ellipsoid:
    """Axis-aligned ellipsoid in physical coordinates (mm)."""

    center: tuple[float, float, float]
    radii: tuple[float, float, float]

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        (cx, cy, cz), (rx, ry, rz) = self.center, self.radii
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1.0


def _inside_any(shapes: tuple[Ellipsoid, ...], x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    mask = np.zeros(x.shape, dtype=bool)
    for shape in shapes:
        mask |= shape.inside(x, y, z)
    return mask


@dataclass(frozen=True)
class Anatomy:
    """One patient: a neck along z around (axis_x, axis_y) between z_lo and z_hi (the CT field of view), plus the
    lesions and the physiological hot spots, all in physical mm."""

    axis_x: float
    axis_y: float
    z_lo: float
    z_hi: float
    scale: float
    gtvp: tuple[Ellipsoid, ...]
    gtvp_hu: float
    gtvp_suv: float
    nodes: tuple[Ellipsoid, ...]
    node_hu: tuple[float, ...]
    node_suv: tuple[float, ...]
    mimics: tuple[tuple[Ellipsoid, ...], ...]
    mimic_suv: tuple[float, ...]
    tonsils: tuple[Ellipsoid, Ellipsoid]
    tonsil_suv: float
    vocal_cords: tuple[Ellipsoid, Ellipsoid]
    vocal_cord_suv: float
    brain: Ellipsoid
    brain_suv: float


@dataclass(frozen=True)
class RigidMotion:
    """How the patient moved from the CT to the PET: a CT point `x` of the anatomy is at
    R (x - center) + center + translation in the PET, R the rotation by `angle_deg` about the unit vector `axis`."""

    center: tuple[float, float, float]
    axis: tuple[float, float, float]
    angle_deg: float
    translation: tuple[float, float, float]

    def transform(self) -> sitk.VersorRigid3DTransform:
        """The motion as the SimpleITK transform a registration of PET (moving) to CT (fixed) should find."""
        motion = sitk.VersorRigid3DTransform()
        motion.SetCenter(self.center)
        motion.SetRotation(self.axis, math.radians(self.angle_deg))
        motion.SetTranslation(self.translation)
        return motion

    def to_anatomy(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, ...]:
        """PET points -> the anatomy points they show (the inverse motion), for arrays of coordinates."""
        rotation = np.reshape(self.transform().GetMatrix(), (3, 3))
        points = np.stack([x, y, z]) - np.reshape(np.add(self.center, self.translation), (3,) + (1,) * x.ndim)
        moved = np.tensordot(rotation.T, points, axes=1) + np.reshape(self.center, (3,) + (1,) * x.ndim)
        return moved[0], moved[1], moved[2]


@dataclass(frozen=True)
class Case:
    case_id: str
    center: str
    anatomy: Anatomy
    ct_grid: Grid
    pet_grid: Grid
    profile: CenterProfile
    motion: RigidMotion | None = None  # the patient's motion between CT and PET; None: aligned


@dataclass(frozen=True)
class PhantomSummary:
    """What `write_phantom` wrote; str() is the paragraph the CLI prints."""

    out_dir: Path
    size: str
    seed: int
    case_ids: tuple[str, ...]
    test_case_ids: tuple[str, ...]
    cases_without_gtvn: tuple[str, ...]
    misalign: tuple[float, float] | None = None
    labelled_test_case_ids: tuple[str, ...] = ()

    def __str__(self) -> str:
        def centers(ids: tuple[str, ...]) -> str:
            return ", ".join(dict.fromkeys(i.split("-")[0] for i in ids))

        test = (f", plus {len(self.test_case_ids)} unlabelled test cases in imagesTs/ ({centers(self.test_case_ids)})"
                if self.test_case_ids else "")
        if self.labelled_test_case_ids:
            test += (f", plus {len(self.labelled_test_case_ids)} labelled test cases in imagesTs/ and labelsTs/ "
                     f"({centers(self.labelled_test_case_ids)}; in no cross-validation split)")
        if self.misalign is not None:
            test += (f"; every PET misaligned by {self.misalign[0]:g} mm and {self.misalign[1]:g} degrees (truth in "
                     f"{MISALIGNMENT_FILE})")
        return (f"Wrote a synthetic HECKTOR 2022 phantom to {self.out_dir} (size '{self.size}', seed {self.seed}): "
                f"{len(self.case_ids)} training cases from {centers(self.case_ids)} in imagesTr/ (CT in HU; PET in "
                f"SUV on its own {PET_PIXEL_MM:g} mm grid) and labelsTr/ (1 GTVp, 2 GTVn; "
                f"{len(self.cases_without_gtvn)} cases without GTVn){test}; clinical and relapse-free survival "
                f"tables in {CLINICAL_CSV} and {ENDPOINT_CSV}. Next: pemma convert-hecktor {self.out_dir} "
                f"--dataset-id N --name NAME")


def write_phantom(out_dir: Path, cases_per_center: int, size: str = "small", seed: int = 0,
                  test_cases_per_center: int = 0, misalign: tuple[float, float] | None = None,
                  labelled_test_cases_per_center: int = 0) -> PhantomSummary:
    """Write `cases_per_center` labelled cases for each HECKTOR 2022 training centre (and optionally unlabelled test
    cases of the test centres, and labelled test cases of every training centre in imagesTs/ + labelsTs/) with the
    clinical and endpoint tables into `out_dir`, atomically: the files are built in a temporary sibling folder and
    moved in at the end, so a failed run leaves nothing half-written.

    Each case is seeded from (seed, case id): the same arguments give the same bytes, and more cases per centre
    leave the existing ones unchanged. misalign: (mm, degrees) of patient motion between CT and PET in every case
    (random directions; the truth goes to MISALIGNMENT_FILE); None or (0, 0): aligned.
    """
    out_dir = Path(out_dir)
    _validate(out_dir, cases_per_center, size, seed, test_cases_per_center, misalign, labelled_test_cases_per_center)
    misalign = None if misalign is None or not any(misalign) else (float(misalign[0]), float(misalign[1]))
    train = [(c, f"{c}-{i:03d}") for c in TRAINING_CENTERS_2022 for i in range(1, cases_per_center + 1)]
    test = [(c, f"{c}-{i + (TEST_ID_OFFSET if c in TRAINING_CENTERS_2022 else 0):03d}")
            for c in TEST_CENTERS_2022 for i in range(1, test_cases_per_center + 1)]
    labelled = [(c, f"{c}-{i + LABELLED_TEST_ID_OFFSET:03d}") for c in TRAINING_CENTERS_2022
                for i in range(1, labelled_test_cases_per_center + 1)]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        no_nodes = _write_cases(tmp, train, test, labelled, SIZES[size], seed, misalign)
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PhantomSummary(out_dir=out_dir, size=size, seed=seed, case_ids=tuple(i for _, i in train),
                          test_case_ids=tuple(i for _, i in test), cases_without_gtvn=tuple(no_nodes),
                          misalign=misalign, labelled_test_case_ids=tuple(i for _, i in labelled))


def _validate(out_dir: Path, cases_per_center: int, size: str, seed: int, test_cases_per_center: int,
              misalign: tuple[float, float] | None, labelled_test_cases_per_center: int = 0) -> None:
    """Reject bad arguments before anything is written."""
    def count_ok(n: object, low: int) -> bool:
        return isinstance(n, (int, np.integer)) and not isinstance(n, bool) and low <= n <= MAX_CASES_PER_CENTER

    if not count_ok(cases_per_center, 1):
        raise InputDataError(f"cases_per_center must be an integer from 1 to {MAX_CASES_PER_CENTER}, "
                             f"got {cases_per_center!r}")
    if not count_ok(test_cases_per_center, 0):
        raise InputDataError(f"test_cases_per_center must be an integer from 0 to {MAX_CASES_PER_CENTER}, "
                             f"got {test_cases_per_center!r}")
    if not count_ok(labelled_test_cases_per_center, 0):
        raise InputDataError(f"labelled_test_cases_per_center must be an integer from 0 to {MAX_CASES_PER_CENTER}, "
                             f"got {labelled_test_cases_per_center!r}")
    if size not in SIZES:
        raise InputDataError(f"unknown phantom size {size!r}; choose one of {', '.join(SIZES)}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise InputDataError(f"seed must be a non-negative integer, got {seed!r}")
    if misalign is not None:
        values = np.asarray(misalign, dtype=float) if len(misalign) == 2 else np.array([np.nan])
        if not (np.all(np.isfinite(values)) and 0 <= values[0] <= MAX_MISALIGN_MM
                and 0 <= values[1] <= MAX_MISALIGN_DEG):
            raise InputDataError(f"misalign must be a shift from 0 to {MAX_MISALIGN_MM:g} mm and a rotation from 0 to "
                                 f"{MAX_MISALIGN_DEG:g} degrees, got {list(misalign)}")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputDataError(f"{out_dir} exists and is not a folder")
    present = [name for name in HECKTOR_ENTRIES if (out_dir / name).exists()]
    if present:
        raise InputDataError(f"{out_dir} already holds HECKTOR files ({', '.join(present)}); "
                             "choose a new or empty folder")


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished files into place: a rename of the whole folder, or of its entries into an existing one."""
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    for entry in sorted(tmp.iterdir()):
        entry.rename(out_dir / entry.name)


def _write_cases(root: Path, train: list[tuple[str, str]], test: list[tuple[str, str]],
                 labelled: list[tuple[str, str]], size: PhantomSize, seed: int,
                 misalign: tuple[float, float] | None) -> list[str]:
    """Write every case's images (and labels and table rows for training and labelled test cases); returns the
    training cases without GTVn."""
    for folder in ("imagesTr", "labelsTr") + (("imagesTs",) if test or labelled else ()) + (
            ("labelsTs",) if labelled else ()):
        (root / folder).mkdir()
    clinical, endpoint, no_nodes, truth = [], [], [], {}
    jobs = ([(c, i, "imagesTr", "labelsTr") for c, i in train] + [(c, i, "imagesTs", None) for c, i in test]
            + [(c, i, "imagesTs", "labelsTs") for c, i in labelled])
    for center, case_id, folder, label_folder in tqdm(jobs, desc="phantom", unit="case"):
        geometry_rng, ct_rng, pet_rng, patient_rng, motion_rng = _case_rngs(case_id, seed)
        case = _draw_case(case_id, center, size, geometry_rng, misalign, motion_rng)
        if case.motion is not None:
            truth[case_id] = dataclasses.asdict(case.motion)
        ct, label = _ct_and_label(case, ct_rng)
        _write(ct, root / folder / f"{case_id}__CT.nii.gz")
        _write(_pet(case, pet_rng), root / folder / f"{case_id}__PT.nii.gz")
        if label_folder is None:
            continue
        _write(label, root / label_folder / f"{case_id}.nii.gz")
        labels = sitk.GetArrayViewFromImage(label)
        if label_folder == "labelsTr" and not (labels == LABELS_2022["GTVn"]).any():
            no_nodes.append(case_id)
        gtvp_ml = float((labels == LABELS_2022["GTVp"]).sum()) * math.prod(label.GetSpacing()) / 1000.0
        row, outcome = _patient_record(case, gtvp_ml, size, patient_rng)
        clinical.append(row)
        endpoint.append(outcome)
    _write_tables(root, clinical, endpoint)
    if misalign is not None:
        (root / MISALIGNMENT_FILE).write_text(json.dumps(
            {"shift_mm": misalign[0], "rotation_deg": misalign[1], "cases": truth}, indent=1))
    return no_nodes


def read_misalignment(root: Path) -> dict[str, RigidMotion]:
    """The true motion of each case of a phantom written with `misalign`, by case id."""
    path = Path(root) / MISALIGNMENT_FILE
    if not path.is_file():
        raise InputDataError(f"no {MISALIGNMENT_FILE} in {root}: not a phantom written with --misalign")
    cases = json.loads(path.read_text())["cases"]
    return {case_id: RigidMotion(**{k: tuple(v) if isinstance(v, list) else v for k, v in motion.items()})
            for case_id, motion in cases.items()}


def _case_rngs(case_id: str, seed: int) -> tuple[np.random.Generator, ...]:
    """Independent generators for a case's geometry, CT noise, PET noise, clinical record and CT-to-PET motion (the
    first four are those of the aligned phantom: `spawn` keys children by their index)."""
    return tuple(np.random.default_rng(s) for s in np.random.SeedSequence([seed, *case_id.encode()]).spawn(5))


def case_model(case_id: str, center: str, size: str = "small", seed: int = 0,
               misalign: tuple[float, float] | None = None) -> Case:
    """The analytic model (anatomy, lesions, mimics, grids, motion) behind a case `write_phantom` writes with `seed`
    and `misalign`."""
    rngs = _case_rngs(case_id, seed)
    return _draw_case(case_id, center, SIZES[size], rngs[0], misalign, rngs[4])


def _write(image: sitk.Image, path: Path) -> None:
    sitk.WriteImage(image, str(path), useCompression=True)


# --- geometry -----------------------------------------------------------------------------------------------------

def _draw_case(case_id: str, center: str, size: PhantomSize, rng: np.random.Generator,
               misalign: tuple[float, float] | None = None, motion_rng: np.random.Generator | None = None) -> Case:
    """Place the patient in scanner coordinates, choose both grids, draw the lesions and hot spots and, with
    `misalign`, the patient's motion between CT and PET (the PET field of view grows to keep the moved neck)."""
    profile = CENTER_PROFILES[center]
    ct_spacing = (profile.ct_pixel_mm, profile.ct_pixel_mm, profile.ct_slice_mm)
    ct_size = (size.ct_xy_voxels, size.ct_xy_voxels, round(size.z_fov_mm / profile.ct_slice_mm))
    # Table position: realistic, case-specific scanner coordinates, so no code can rely on origin 0.
    axis = np.array([rng.uniform(-20, 20), rng.uniform(-40, 0)])
    ct_center = np.array([*(axis + [0.0, size.anatomy_scale] + rng.uniform(-2, 2, 2) * size.anatomy_scale),
                          rng.uniform(-700, -400)])
    ct_grid = _centered_grid(ct_center, ct_spacing, ct_size)
    pet_spacing = np.array([PET_PIXEL_MM, PET_PIXEL_MM, profile.pet_slice_mm])
    ct_extent = np.asarray(ct_spacing) * ct_size
    motion = None if misalign is None or not any(misalign) else _draw_motion(ct_center, misalign, motion_rng)
    # The farthest a CT corner moves: the PET must still see the whole neck.
    reach = 0.0 if motion is None else misalign[0] + float(np.linalg.norm(ct_extent)) * math.sin(
        math.radians(misalign[1]) / 2)
    pet_size = tuple(int(n) for n in np.ceil((ct_extent + 2 * (PET_MARGIN_MM + reach)) / pet_spacing))
    # A shift of a fraction of a PET voxel: the PET grid is never the CT grid subsampled.
    pet_grid = _centered_grid(ct_center + rng.uniform(-1.5, 1.5, 3), tuple(pet_spacing), pet_size)
    z_lo, z_hi = (float(b[2]) for b in ct_grid.bounds())
    anatomy = _draw_anatomy(float(axis[0]), float(axis[1]), z_lo, z_hi, size, rng)
    return Case(case_id, center, anatomy, ct_grid, pet_grid, profile, motion)


def _draw_motion(center: np.ndarray, misalign: tuple[float, float], rng: np.random.Generator) -> RigidMotion:
    """A rotation of exactly misalign[1] degrees about a random axis through the CT field's centre, then a shift of
    exactly misalign[0] mm in a random direction."""
    axis, direction = (v / np.linalg.norm(v) for v in rng.normal(size=(2, 3)))
    return RigidMotion(tuple(float(v) for v in center), tuple(float(v) for v in axis), float(misalign[1]),
                       tuple(float(v) for v in direction * misalign[0]))


def _centered_grid(center: np.ndarray, spacing: tuple[float, ...], size: tuple[int, ...]) -> Grid:
    origin = np.asarray(center) - np.asarray(spacing) * (np.asarray(size) - 1) / 2
    return Grid(tuple(float(v) for v in origin), tuple(float(v) for v in spacing), tuple(int(n) for n in size))


# Anatomy layout, in units of the anatomy scale (mm for `small`) relative to the neck axis; z as a fraction of the
# field of view from its inferior end. +y is posterior.
BODY = (0.0, 2.0, 21.0, 18.0)  # centre x, y and semi-axes of the neck
FAT_THICKNESS = 2.0
AIRWAY = (0.0, -3.5, 4.0, 3.0)
AIRWAY_TOP = 0.8  # the airway runs from the inferior end up to this fraction of the field of view
CONSTRICTOR = (6.5, 5.5)  # pharyngeal muscle around the airway: outer semi-axes
STERNOCLEIDOMASTOID = (14.0, -4.0, 3.0, 2.5)  # +/- x
VERTEBRA = (0.0, 6.0, 4.5, 1.2)  # centre, radius, cortical rim
DISC_PERIOD, DISC_HEIGHT = 8.0, 2.0
CANAL = (0.0, 13.0, 2.0, 3.2)  # centre, canal radius, outer radius of the bony arch
PARASPINAL = (6.5, 15.5, 4.0, 2.5)  # +/- x
CAROTID = (9.5, 0.5, 1.6)  # +/- x, y, radius: the common carotid arteries
JUGULAR = (12.0, -0.5, 2.2)  # the internal jugular veins, anterolateral to the arteries
MANDIBLE = (0.0, 1.0, 12.5, 15.0, -2.0, 0.62, 0.78)  # centre, inner and outer radius, anterior of y, z range
GTVP_Z = (0.25, 0.7)
NODE_Z = (0.2, 0.55)
NODE_COUNT_P = (0.3, 0.3, 0.25, 0.15)  # P(0, 1, 2, 3 lymph nodes)

# Difficulty calibration (README, "The phantom"): which modality shows what.
# - CT shows the GTVp only faintly: a few HU above the pharyngeal muscle it grows in, under 10-20 HU of noise;
#   lymph nodes are round, somewhat denser structures in soft tissue (the usual CT sign).
# - PET shows every lesion clearly but blurred (4 mm voxels, 5-7.5 mm PSF), and also shows "mimics": benign uptake
#   (inflamed mucosa, muscle) beside the airway at the tumour's level, as hot as tumour and invisible on CT.
# So CT alone is hard, PET alone is fooled by mimics, and CT+PET is best: PET finds candidates, CT tells them apart.
GTVP_HU_ABOVE_MUSCLE = (4.0, 12.0)
GTVP_SUV = (4.0, 14.0)
NODE_HU_ABOVE_MUSCLE = (15.0, 30.0)
NODE_SUV = (3.0, 8.0)
MIMIC_COUNT_P = (0.1, 0.45, 0.45)  # P(0, 1, 2 mimics) drawn; one that finds no free place is left out
MIMIC_SUV = (4.0, 14.0)

# Contrast-enhanced CT (a centre's `ct_contrast_hu` = c): HU added to each tissue, as fractions of c. Arteries
# take it all, veins most; tumour and nodes enhance at their rim (outside LESION_CORE of their radii) more than in
# their core; muscle and mucosa a little. So a model that learnt non-contrast CT meets bright tubes beside the nodes
# and lesions that are brighter than any it saw, with a ring.
ENHANCEMENT = {"artery": 1.0, "vein": 0.8, "lesion_rim": 0.35, "lesion_core": 0.12, "muscle": 0.08}
LESION_CORE = 0.7


def _draw_anatomy(axis_x: float, axis_y: float, z_lo: float, z_hi: float, size: PhantomSize,
                  rng: np.random.Generator) -> Anatomy:
    """Draw the case-specific structures: GTVp, nodes, tonsils, vocal cords and brain, with their intensities."""
    s, length = size.anatomy_scale, z_hi - z_lo
    airway = np.array([axis_x + AIRWAY[0] * s, axis_y + AIRWAY[1] * s])
    gtvp = _draw_gtvp(airway, z_lo + rng.uniform(*GTVP_Z) * length, size, rng)
    nodes = _draw_nodes(gtvp, axis_x, axis_y, z_lo, length, size, rng)
    mimics = _draw_mimics(airway, gtvp + nodes, size, z_lo, length, rng)
    tonsil_z, tonsil_radii = z_lo + 0.68 * length, np.array([3.5, 4.0, 6.0]) * s * rng.uniform(0.9, 1.15)
    tonsils = tuple(Ellipsoid((airway[0] + side * 7.5 * s, airway[1], tonsil_z), tuple(tonsil_radii))
                    for side in (-1, 1))
    cords = tuple(Ellipsoid((airway[0] + side * 2.2 * s, airway[1], z_lo + 0.2 * length),
                            (1.4 * s, 2.2 * s, 2.0 * s)) for side in (-1, 1))
    return Anatomy(
        axis_x=axis_x, axis_y=axis_y, z_lo=z_lo, z_hi=z_hi, scale=s,
        gtvp=gtvp, gtvp_hu=MUSCLE[0] + rng.uniform(*GTVP_HU_ABOVE_MUSCLE), gtvp_suv=rng.uniform(*GTVP_SUV),
        nodes=nodes, node_hu=tuple(MUSCLE[0] + rng.uniform(*NODE_HU_ABOVE_MUSCLE, len(nodes))),
        node_suv=tuple(rng.uniform(*NODE_SUV, len(nodes))),
        mimics=mimics, mimic_suv=tuple(rng.uniform(*MIMIC_SUV, len(mimics))),
        tonsils=tonsils, tonsil_suv=rng.uniform(5, 9),
        vocal_cords=cords, vocal_cord_suv=rng.uniform(3, 5) if rng.random() < 0.5 else SOFT[1],
        brain=Ellipsoid((axis_x, axis_y + 3 * s, z_hi + 14 * s), (15 * s, 14 * s, 24 * s)),
        brain_suv=rng.uniform(7, 11))


def _draw_gtvp(airway: np.ndarray, z: float, size: PhantomSize, rng: np.random.Generator) -> tuple[Ellipsoid, ...]:
    """An irregular primary tumour in the pharyngeal wall (lateral or anterior of the airway): a main ellipsoid
    with one to three satellites."""
    radius = rng.uniform(*size.gtvp_radius_mm)
    angle = rng.uniform(-math.pi, 0.0)  # -y is anterior: never towards the spine
    distance = AIRWAY[2] * size.anatomy_scale + 0.5 * radius
    center = np.array([*(airway + distance * np.array([math.cos(angle), math.sin(angle)])), z])
    parts = [Ellipsoid(tuple(center), tuple(radius * rng.uniform(0.75, 1.25, 3)))]
    for _ in range(rng.integers(1, 4)):
        direction = rng.normal(size=3)
        offset = direction / np.linalg.norm(direction) * radius * rng.uniform(0.4, 0.8)
        parts.append(Ellipsoid(tuple(center + offset), tuple(radius * rng.uniform(0.35, 0.7, 3))))
    return tuple(parts)


def _draw_nodes(gtvp: tuple[Ellipsoid, ...], axis_x: float, axis_y: float, z_lo: float, length: float,
                size: PhantomSize, rng: np.random.Generator) -> tuple[Ellipsoid, ...]:
    """0-3 lymph nodes lateral to the airway that touch neither the GTVp nor each other."""
    s, nodes = size.anatomy_scale, []
    for _ in range(rng.choice(len(NODE_COUNT_P), p=NODE_COUNT_P)):
        for _attempt in range(20):
            radius = rng.uniform(*size.node_radius_mm)
            node = Ellipsoid((axis_x + rng.choice([-1, 1]) * rng.uniform(8, 12) * s, axis_y + rng.uniform(-7, -1) * s,
                              z_lo + rng.uniform(*NODE_Z) * length), tuple(radius * rng.uniform(0.85, 1.15, 3)))
            if all(_apart(node, other, gap=1.0) for other in gtvp + tuple(nodes)):
                nodes.append(node)
                break
    return tuple(nodes)


def _draw_mimics(airway: np.ndarray, lesions: tuple[Ellipsoid, ...], size: PhantomSize, z_lo: float, length: float,
                 rng: np.random.Generator) -> tuple[tuple[Ellipsoid, ...], ...]:
    """0-2 benign uptake sites drawn exactly like a GTVp (shape, size, place) that touch no lesion: on PET
    indistinguishable from tumour, on CT unchanged tissue."""
    mimics: list[tuple[Ellipsoid, ...]] = []
    for _ in range(rng.choice(len(MIMIC_COUNT_P), p=MIMIC_COUNT_P)):
        for _attempt in range(40):
            mimic = _draw_gtvp(airway, z_lo + rng.uniform(*GTVP_Z) * length, size, rng)
            if all(_apart(part, other, gap=1.0) for part in mimic for other in lesions + sum(mimics, ())):
                mimics.append(mimic)
                break
    return tuple(mimics)


def _apart(a: Ellipsoid, b: Ellipsoid, gap: float) -> bool:
    """Bounding spheres at least `gap` mm apart."""
    return float(np.linalg.norm(np.subtract(a.center, b.center))) >= max(a.radii) + max(b.radii) + gap


# --- rendering ----------------------------------------------------------------------------------------------------

def _core(shapes: tuple[Ellipsoid, ...], x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Inside the shapes shrunk to LESION_CORE of their radii: what is not core is a lesion's rim."""
    return _inside_any(tuple(Ellipsoid(e.center, tuple(LESION_CORE * r for r in e.radii)) for e in shapes), x, y, z)


def _render(anat: Anatomy, x: np.ndarray, y: np.ndarray, z: np.ndarray,
            contrast_hu: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True HU, SUV and label at physical points: later structures overwrite earlier ones. `contrast_hu`: the
    arterial enhancement of contrast-enhanced CT (ENHANCEMENT; 0 = non-contrast)."""
    s = anat.scale
    muscle = (MUSCLE[0] + ENHANCEMENT["muscle"] * contrast_hu, MUSCLE[1])
    u, v = (x - anat.axis_x) / s, (y - anat.axis_y) / s  # in-plane, in anatomy units
    w = (z - anat.z_lo) / (anat.z_hi - anat.z_lo)  # fraction of the field of view, 0 = inferior
    hu, suv = np.full(x.shape, AIR[0], np.float32), np.zeros(x.shape, np.float32)
    label = np.zeros(x.shape, np.uint8)

    def paint(mask: np.ndarray, tissue: tuple[float, float]) -> None:
        hu[mask], suv[mask] = tissue

    def ellipse(cx: float, cy: float, a: float, b: float) -> np.ndarray:
        return ((u - cx) / a) ** 2 + ((v - cy) / b) ** 2 <= 1.0

    body, inner = ellipse(*BODY), ellipse(BODY[0], BODY[1], BODY[2] - FAT_THICKNESS, BODY[3] - FAT_THICKNESS)
    paint(body, FAT)
    paint(inner, SOFT)
    pharynx = w <= AIRWAY_TOP
    paint(pharynx & ellipse(AIRWAY[0], AIRWAY[1], *CONSTRICTOR), muscle)
    for side in (-1, 1):
        paint(ellipse(side * STERNOCLEIDOMASTOID[0], *STERNOCLEIDOMASTOID[1:]), muscle)
        paint(ellipse(side * PARASPINAL[0], *PARASPINAL[1:]), muscle)
        for (vx, vy, radius), kind in ((CAROTID, "artery"), (JUGULAR, "vein")):
            blood = (BLOOD[0] + ENHANCEMENT[kind] * contrast_hu, BLOOD[1])
            paint(inner & ellipse(side * vx, vy, radius, radius), blood)
    _paint_spine(paint, u, v, z / s)
    radius = np.hypot(u - MANDIBLE[0], v - MANDIBLE[1])
    paint((radius >= MANDIBLE[2]) & (radius <= MANDIBLE[3]) & (v < MANDIBLE[4]) & (w >= MANDIBLE[5])
          & (w <= MANDIBLE[6]), CORTICAL)
    skull = anat.brain.radii[0] + 2 * s, anat.brain.radii[1] + 2 * s, anat.brain.radii[2] + 2 * s
    paint(body & Ellipsoid(anat.brain.center, skull).inside(x, y, z), CORTICAL)
    paint(body & anat.brain.inside(x, y, z), (BRAIN_HU, anat.brain_suv))
    paint(pharynx & ellipse(*AIRWAY), AIR)
    paint(_inside_any(anat.vocal_cords, x, y, z), (muscle[0], anat.vocal_cord_suv))
    paint(_inside_any(anat.tonsils, x, y, z), (muscle[0], anat.tonsil_suv))
    in_tissue = inner & (hu > -500)  # lesions and mimics grow in tissue, not into the airway's lumen
    for mimic, mimic_suv in zip(anat.mimics, anat.mimic_suv):
        suv[in_tissue & _inside_any(mimic, x, y, z)] = mimic_suv  # uptake only: CT keeps its tissue
    # Lesions last, inside the fat layer and outside the airway: the label is exactly where they are painted.
    rim, core = ENHANCEMENT["lesion_rim"] * contrast_hu, ENHANCEMENT["lesion_core"] * contrast_hu
    for node, node_hu, node_suv in zip(anat.nodes, anat.node_hu, anat.node_suv):
        mask = in_tissue & node.inside(x, y, z)
        paint(mask, (node_hu + rim, node_suv))
        if contrast_hu:
            hu[mask & _core((node,), x, y, z)] = node_hu + core
        label[mask] = LABELS_2022["GTVn"]
    mask = in_tissue & _inside_any(anat.gtvp, x, y, z)
    paint(mask, (anat.gtvp_hu + rim, anat.gtvp_suv))
    if contrast_hu:
        hu[mask & _core(anat.gtvp, x, y, z)] = anat.gtvp_hu + core
    label[mask] = LABELS_2022["GTVp"]
    return hu, suv, label


def _paint_spine(paint: Callable[[np.ndarray, tuple[float, float]], None], u: np.ndarray, v: np.ndarray,
                 z: np.ndarray) -> None:
    """Vertebral bodies (cortical rim, cancellous core, discs between them) and the bony arch around the cord."""
    r = np.hypot(u - VERTEBRA[0], v - VERTEBRA[1])
    paint(r <= VERTEBRA[2], CORTICAL)
    disc = np.mod(z, DISC_PERIOD) < DISC_HEIGHT
    paint((r <= VERTEBRA[2] - VERTEBRA[3]) & ~disc, CANCELLOUS)
    paint((r <= VERTEBRA[2]) & disc, DISC)
    r = np.hypot(u - CANAL[0], v - CANAL[1])
    paint(r <= CANAL[3], CORTICAL)
    paint(r <= CANAL[2], CORD)


def _ct_and_label(case: Case, rng: np.random.Generator) -> tuple[sitk.Image, sitk.Image]:
    """CT in HU (int16) after the centre's reconstruction kernel and noise, and the label (uint8) on the same grid."""
    grid, profile = case.ct_grid, case.profile
    hu, _, label = _render(case.anatomy, *grid.coordinates(), contrast_hu=profile.ct_contrast_hu)
    sigma = (0.0, profile.ct_kernel_mm / grid.spacing[1], profile.ct_kernel_mm / grid.spacing[0])
    noise = ndimage.gaussian_filter(rng.standard_normal(hu.shape), sigma)
    ct = ndimage.gaussian_filter(hu, sigma) + noise * (profile.ct_noise_hu / noise.std())
    ct = np.clip(np.rint(ct), *HU_RANGE).astype(np.int16)
    return grid.image(ct), grid.image(label)


def _pet(case: Case, rng: np.random.Generator) -> sitk.Image:
    """PET in SUV (float32) on its own grid: partial-volume activity, scanner PSF, Poisson noise, calibration."""
    grid, profile, k = case.pet_grid, case.profile, PET_SUPERSAMPLE
    points = grid.coordinates(k)
    _, suv, _ = _render(case.anatomy, *(points if case.motion is None else case.motion.to_anatomy(*points)))
    nx, ny, nz = grid.size
    activity = suv.reshape(nz, k, ny, k, nx, k).mean(axis=(1, 3, 5))
    sigma = tuple(profile.pet_fwhm_mm * FWHM_TO_SIGMA / sp for sp in reversed(grid.spacing))
    activity = np.clip(ndimage.gaussian_filter(activity, sigma, mode="constant"), 0.0, None)
    counts = rng.poisson(activity * profile.pet_counts_per_suv)
    return grid.image((counts * (profile.suv_scale / profile.pet_counts_per_suv)).astype(np.float32))


# --- tables -------------------------------------------------------------------------------------------------------

BASELINE_HAZARD_PER_DAY = 1.0 / (4 * 365.0)
FOLLOW_UP_DAYS = (365.0, 5 * 365.0)  # administrative censoring: uniform follow-up
RISK_LOG_VOLUME, RISK_LOG_SUV, RISK_PER_NODE, RISK_HPV_POSITIVE = 1.8, 0.8, 0.35, -0.6
RISK_PER_YEAR_OVER_60 = 0.04


def _patient_record(case: Case, gtvp_ml: float, size: PhantomSize,
                    rng: np.random.Generator) -> tuple[dict[str, object], dict[str, object]]:
    """HECKTOR-like clinical row (with missing values) and relapse-free survival from a proportional-hazards model.

    The time to relapse is exponential with hazard BASELINE_HAZARD_PER_DAY * exp(risk), where
        risk = 1.8 log(V / V_ref) + 0.8 log(SUV / 10) + 0.35 nodes - 0.6 HPV+ + 0.04 (age - 60),
    V the GTVp volume in the label (V_ref: a sphere of the size's mean GTVp radius), SUV the GTVp's uptake in the
    model (drawn independently of its shape, size and HU: what PET shows beyond CT), nodes the number of GTVn, HPV+
    the true HPV status (the table leaves 30 % of it blank) and age the table's Age. Follow-up is uniform over
    FOLLOW_UP_DAYS (administrative censoring): RFS = min(relapse, follow-up), Relapse = relapse within follow-up.
    """
    def maybe_missing(value: object, p_missing: float) -> object:
        return pd.NA if rng.random() < p_missing else value

    hpv_positive = rng.random() < 0.5
    row = {
        "PatientID": case.case_id, "Task 1": 1, "Task 2": 1, "CenterID": CENTER_IDS[case.center],
        "Gender": "M" if rng.random() < 0.8 else "F",
        "Age": int(np.clip(np.rint(rng.normal(61, 9)), 30, 90)),
        "Weight": maybe_missing(round(float(rng.normal(78, 15)), 1), 0.05),
        "Tobacco": maybe_missing(int(rng.random() < 0.55), 0.4),
        "Alcohol": maybe_missing(int(rng.random() < 0.45), 0.4),
        "Performance status": maybe_missing(int(rng.choice(3, p=(0.5, 0.4, 0.1))), 0.3),
        "HPV status (0=-, 1=+)": maybe_missing(int(hpv_positive), 0.3),
        "Surgery": int(rng.random() < 0.2),
        "Chemotherapy": int(rng.random() < 0.85),
    }
    reference_ml = 4.0 / 3.0 * math.pi * (sum(size.gtvp_radius_mm) / 2) ** 3 / 1000.0
    risk = (RISK_LOG_VOLUME * math.log(max(gtvp_ml, 1e-3) / reference_ml)
            + RISK_LOG_SUV * math.log(case.anatomy.gtvp_suv / 10.0)
            + RISK_PER_NODE * len(case.anatomy.nodes) + RISK_HPV_POSITIVE * hpv_positive
            + RISK_PER_YEAR_OVER_60 * (row["Age"] - 60))
    relapse_day = rng.exponential(1.0 / (BASELINE_HAZARD_PER_DAY * math.exp(risk)))
    follow_up = rng.uniform(*FOLLOW_UP_DAYS)
    outcome = {"PatientID": case.case_id, "Relapse": int(relapse_day <= follow_up),
               "RFS": max(1, math.ceil(min(relapse_day, follow_up)))}
    return row, outcome


def _write_tables(root: Path, clinical: list[dict[str, object]], endpoint: list[dict[str, object]]) -> None:
    table = pd.DataFrame(clinical, columns=list(CLINICAL_COLUMNS))
    for column in ("Tobacco", "Alcohol", "Performance status", "HPV status (0=-, 1=+)"):
        table[column] = table[column].astype("Int64")
    table["Weight"] = table["Weight"].astype("Float64")
    table.to_csv(root / CLINICAL_CSV, index=False)
    pd.DataFrame(endpoint, columns=list(ENDPOINT_COLUMNS)).to_csv(root / ENDPOINT_CSV, index=False)
