"""Late fusion (PEMMA paper, eq. 1): a CT model and a PET model, their softmax outputs averaged with weight w_C.

M_CP = w_C * M_C + (1 - w_C) * M_P for CT+PET input; with one modality the available model is used alone.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from nnunetv2_pemma.errors import PlansError
from nnunetv2_pemma.inference import build_predictor, model_folder_of


@dataclass(frozen=True)
class ModelRef:
    """A trained nnU-Net model: dataset, trainer and configuration (and folds, plans identifier)."""

    dataset: str
    trainer: str
    configuration: str
    folds: tuple[int | str, ...] = (0,)
    plans: str = "nnUNetPlans"

    def folder(self) -> Path:
        return model_folder_of(self.dataset, self.trainer, self.configuration, self.plans)


def _cases(input_dir: Path, n_channels: int) -> list[str]:
    cases = sorted(p.name[:-len("_0000.nii.gz")] for p in input_dir.glob("*_0000.nii.gz"))
    if not cases:
        raise PlansError(f"{input_dir}: no CASE_0000.nii.gz files")
    for case in cases:
        missing = [i for i in range(n_channels) if not (input_dir / f"{case}_{i:04d}.nii.gz").is_file()]
        if missing:
            raise PlansError(f"case {case} in {input_dir}: channel file(s) {missing} missing")
    return cases


def _one_modality_folder(input_dir: Path, cases: list[str], channel: int, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for case in cases:
        (folder / f"{case}_0000.nii.gz").symlink_to((input_dir / f"{case}_{channel:04d}.nii.gz").resolve())
    return folder


def _predict(model: ModelRef, inputs: Path, out: Path, device: str, tta: bool, probabilities: bool) -> None:
    predictor = build_predictor(model.folder(), model.folds, None, device=device, tta=tta)
    # in-process: worker pools would each import torch again, which costs more than a few cases take
    out.mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files_sequential(str(inputs), str(out), save_probabilities=probabilities, overwrite=True)


def predict_late_fusion(input_dir: Path, output_dir: Path, modalities: Sequence[str], ct_model: ModelRef | None,
                        pet_model: ModelRef | None, w_ct: float = 0.5, device: str = "cpu", tta: bool = True
                        ) -> list[Path]:
    """Segment every case of `input_dir` (channels = `modalities`, in order) by late fusion."""
    modalities = [m.upper() for m in modalities]
    if not 0.0 <= w_ct <= 1.0:
        raise PlansError(f"--w-ct must lie in [0, 1], got {w_ct}")
    needed = {"CT": ct_model, "PET": pet_model}
    absent = [m for m in modalities if needed.get(m, 0) is None]
    if absent or not set(modalities) <= {"CT", "PET"} or not modalities:
        raise PlansError(f"--modalities {modalities}: late fusion needs CT and/or PET, each with its model "
                         f"(--ct-model / --pet-model)")
    cases = _cases(input_dir, len(modalities))
    output_dir.mkdir(parents=True, exist_ok=True)
    fuse = len(modalities) == 2
    with tempfile.TemporaryDirectory(prefix="pemma_late_fusion_") as tmp:
        outputs = {}
        for m in modalities:
            inputs = _one_modality_folder(input_dir, cases, modalities.index(m), Path(tmp) / f"in_{m}")
            outputs[m] = Path(tmp) / f"out_{m}" if fuse else output_dir
            _predict(needed[m], inputs, outputs[m], device, tta, probabilities=fuse)
        if not fuse:
            return [output_dir / f"{c}.nii.gz" for c in cases]
        for case in cases:
            p_ct = np.load(outputs["CT"] / f"{case}.npz")["probabilities"]
            p_pet = np.load(outputs["PET"] / f"{case}.npz")["probabilities"]
            if p_ct.shape != p_pet.shape:
                raise PlansError(f"case {case}: CT and PET models predict different shapes {p_ct.shape} vs "
                                 f"{p_pet.shape} (different labels or input grids)")
            fused = (w_ct * p_ct + (1.0 - w_ct) * p_pet).argmax(0).astype(np.uint8)
            reference = sitk.ReadImage(str(outputs["CT"] / f"{case}.nii.gz"))
            image = sitk.GetImageFromArray(fused)
            image.CopyInformation(reference)
            sitk.WriteImage(image, str(output_dir / f"{case}.nii.gz"), True)
    return [output_dir / f"{c}.nii.gz" for c in cases]
