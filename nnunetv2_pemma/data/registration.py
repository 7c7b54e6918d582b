"""Rigid registration of PET to CT (`pemma convert-hecktor --register rigid`, `pemma check-alignment`).

PEMMA assumes PET and CT on one physical frame; real scans may disagree (the patient moved between the CT and the PET
bed positions, a site exported the two with different frames). SimpleITK's registration framework finds the rigid
motion: 6 parameters (Euler angles about the CT body's centre, translation), Mattes mutual information (PET and CT
intensities are unrelated), multi-resolution, started from the header geometry (the identity), sampled inside the
CT body dilated by BODY_MARGIN_MM so that the body outline counts.

Three details make it robust on the neck, whose outline barely changes along z:
- the PET is padded with zeros, so CT body that moves out of the PET field counts as a mismatch instead of being
  dropped from the metric (which would reward moving away);
- the refinement restarts from several z offsets within the plausibility limit and keeps the best full-resolution
  metric, because a wrong z and a slightly wrong tilt form a local optimum;
- a last exhaustive search along z on the full-resolution metric, where the sampled metric is too flat to settle.

The header geometry is kept unless the registration beats it by MIN_MI_GAIN (relative mutual information), so that
already registered cases are not moved by the metric's own bias (a few mm along z on the phantom).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from nnunetv2_pemma.data.geometry import BODY_HU, sitk_error_reason
from nnunetv2_pemma.errors import InputDataError

BODY_MARGIN_MM = 10.0  # the metric's mask: CT body dilated by this much
PET_PADDING_MM = 60.0  # zeros around the PET: beyond any plausible motion
HISTOGRAM_BINS = 64
SAMPLING_FRACTION = 0.3  # random metric samples per level (fixed seed: the same input gives the same transform)...
MAX_SAMPLES = 100_000  # ...at most this many per level, so that a full-size CT region costs little more
SEED = 1
Z_START_STEP_MM = 8.0  # the refinement's restarts along z, within the shift limit
Z_SEARCH_STEPS = 6  # the final search along z: +-6 mm in 1 mm steps
MIN_MI_GAIN = 0.03  # relative improvement of mutual information over the header geometry needed to move the PET


@dataclass(frozen=True)
class RegistrationLimits:
    """How far a registration may move the PET before the case is refused as implausible."""

    max_shift_mm: float = 20.0  # displacement of the CT body's centre
    max_rotation_deg: float = 10.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_shift_mm) and self.max_shift_mm > 0
                and math.isfinite(self.max_rotation_deg) and self.max_rotation_deg > 0):
            raise InputDataError(f"registration limits must be positive, got {self.max_shift_mm:g} mm and "
                                 f"{self.max_rotation_deg:g} degrees")


@dataclass(frozen=True)
class Registration:
    """The rigid transform found for one case (maps CT points to PET points, as `sitk.Resample` wants) and how
    good it is."""

    transform: sitk.Euler3DTransform
    shift_mm: float  # how far the transform moves the CT body's centre
    rotation_deg: float
    mi_header: float  # Mattes mutual information (negated by ITK: lower is better) at the header geometry
    mi_registered: float  # ... at the transform found
    seconds: float

    @property
    def gain(self) -> float:
        """Relative improvement of the mutual information over the header geometry."""
        return (self.mi_header - self.mi_registered) / max(abs(self.mi_header), 1e-12)

    @property
    def applied(self) -> bool:
        """Whether the PET is moved: only when the registration clearly beats the header geometry."""
        return self.gain > MIN_MI_GAIN

    def problem(self, limits: RegistrationLimits) -> str | None:
        """Why the transform is implausible, or None."""
        if not self.applied:
            return None
        if self.shift_mm > limits.max_shift_mm or self.rotation_deg > limits.max_rotation_deg:
            return (f"rigid registration moved the PET implausibly far ({self.shift_mm:.1f} mm, "
                    f"{self.rotation_deg:.1f} degrees; limits {limits.max_shift_mm:g} mm, "
                    f"{limits.max_rotation_deg:g} degrees)")
        return None

    def record(self) -> dict:
        """JSON-ready: the transform (SimpleITK's Euler3DTransform parameters) and the quality figures."""
        return {"transform": "Euler3DTransform", "parameters": list(self.transform.GetParameters()),
                "fixed_parameters": list(self.transform.GetFixedParameters()), "applied": self.applied,
                "shift_mm": self.shift_mm, "rotation_deg": self.rotation_deg, "mi_header": self.mi_header,
                "mi_registered": self.mi_registered, "mi_gain": self.gain, "seconds": self.seconds}


class RegistrationFailed(Exception):
    """The registration could not run or gave no usable result; the message says why (no case name)."""


def transform_from_record(record: dict) -> sitk.Transform:
    """The transform a conversion applied to a case's PET (identity when the header geometry was kept)."""
    transform = sitk.Euler3DTransform()
    if record.get("applied"):
        transform.SetFixedParameters(record["fixed_parameters"])
        transform.SetParameters(record["parameters"])
    return transform


@contextlib.contextmanager
def _one_itk_thread() -> Iterator[None]:
    """ITK's threads hand out work dynamically and sum the metric in whatever order they finish, so the transform
    found would differ in its last digits from run to run; on one thread it is the same every time. Conversions
    run cases in parallel instead (convert-hecktor --workers)."""
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def register_pet_to_ct(ct: sitk.Image, pet: sitk.Image, limits: RegistrationLimits) -> Registration:
    """Find the rigid motion that best aligns `pet` to `ct` (the region that will be written: crop it first), on
    one ITK thread (the same transform every run).

    Raises RegistrationFailed when there is no body in the CT, no signal in the PET under it, or SimpleITK gives up.
    """
    with _one_itk_thread():
        return _register(ct, pet, limits)


def _register(ct: sitk.Image, pet: sitk.Image, limits: RegistrationLimits) -> Registration:
    start = time.perf_counter()
    fixed = sitk.Cast(ct, sitk.sitkFloat32)
    body = ct > BODY_HU
    if not np.any(sitk.GetArrayViewFromImage(body)):
        raise RegistrationFailed(f"no body in the CT (no voxel above {BODY_HU:g} HU) to register the PET to")
    values = sitk.GetArrayViewFromImage(pet)
    if values.min() == values.max():
        raise RegistrationFailed(f"the PET has the same value ({values.flat[0]:g}) in every voxel: no PET signal to "
                                 f"register")
    mask = sitk.BinaryDilate(body, [max(1, round(BODY_MARGIN_MM / s)) for s in ct.GetSpacing()])
    pad = [int(math.ceil(PET_PADDING_MM / s)) for s in pet.GetSpacing()]
    moving = sitk.ConstantPad(sitk.Cast(pet, sitk.sitkFloat32), pad, pad, 0.0)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(body)
    center = stats.GetCentroid(1)
    header = sitk.Euler3DTransform()
    header.SetCenter(center)
    try:
        mi_header = _metric(fixed, moving, mask, header)
        if not np.isfinite(mi_header) or mi_header >= 0:
            raise RegistrationFailed("PET and CT share no information under the CT body at the header geometry "
                                     "(no PET signal there?)")
        transform = _optimise(fixed, moving, mask, sitk.Euler3DTransform(header), [4, 2, 1], [2.0, 1.0, 0.0])
        candidates = []
        reach = int(limits.max_shift_mm // Z_START_STEP_MM)
        for dz in Z_START_STEP_MM * np.arange(-reach, reach + 1):
            candidate = sitk.Euler3DTransform(transform)
            candidate.SetTranslation(np.add(candidate.GetTranslation(), (0.0, 0.0, float(dz))).tolist())
            candidate = _optimise(fixed, moving, mask, candidate, [2, 1], [1.0, 0.0])
            candidates.append((_metric(fixed, moving, mask, candidate), candidate))
        transform = _z_line_search(fixed, moving, mask, min(candidates, key=lambda c: c[0])[1])
        mi_registered = _metric(fixed, moving, mask, transform)
    except RuntimeError as e:
        raise RegistrationFailed(f"SimpleITK's registration failed: {sitk_error_reason(e)}") from None
    if not np.isfinite(mi_registered):
        raise RegistrationFailed("the registration's metric is not finite")
    return Registration(transform, _displacement(transform, center), _rotation_deg(transform), float(mi_header),
                        float(mi_registered), time.perf_counter() - start)


def _method(mask: sitk.Image, shrink: list[int], smoothing_mm: list[float]) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
    method.SetMetricFixedMask(mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel(smoothing_mm)
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return method


def _optimise(fixed: sitk.Image, moving: sitk.Image, mask: sitk.Image, transform: sitk.Euler3DTransform,
              shrink: list[int], smoothing_mm: list[float]) -> sitk.Euler3DTransform:
    method = _method(mask, shrink, smoothing_mm)
    method.SetMetricSamplingStrategy(method.RANDOM)
    voxels = np.prod(fixed.GetSize())
    method.SetMetricSamplingPercentagePerLevel(
        [min(SAMPLING_FRACTION, MAX_SAMPLES * factor ** 3 / voxels) for factor in shrink], SEED)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=0.01, numberOfIterations=100,
                                                    relaxationFactor=0.5)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed, moving)
    return transform


def _z_line_search(fixed: sitk.Image, moving: sitk.Image, mask: sitk.Image,
                   transform: sitk.Euler3DTransform) -> sitk.Euler3DTransform:
    """The best z shift around `transform` by the full-resolution metric over every masked voxel (SimpleITK's
    exhaustive optimiser): along the neck the sampled metric is too flat for the gradient steps to settle."""
    method = _method(mask, [1], [0.0])
    method.SetOptimizerAsExhaustive(numberOfSteps=[0, 0, 0, 0, 0, Z_SEARCH_STEPS], stepLength=1.0)
    method.SetOptimizerScales([1.0] * 6)
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed, moving)
    return transform


def _metric(fixed: sitk.Image, moving: sitk.Image, mask: sitk.Image, transform: sitk.Transform) -> float:
    """Mattes mutual information over every masked voxel at full resolution (ITK's sign: lower is better)."""
    method = _method(mask, [1], [0.0])
    method.SetInitialTransform(transform)
    return float(method.MetricEvaluate(fixed, moving))


def _displacement(transform: sitk.Transform, point: tuple[float, ...]) -> float:
    return float(np.linalg.norm(np.subtract(transform.TransformPoint(point), point)))


def _rotation_deg(transform: sitk.Euler3DTransform) -> float:
    matrix = np.reshape(transform.GetMatrix(), (3, 3))
    return float(np.degrees(np.arccos(np.clip((np.trace(matrix) - 1.0) / 2.0, -1.0, 1.0))))
