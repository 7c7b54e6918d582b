"""Late fusion (PEMMA paper, eq. 1): a CT model and a PET model, their softmax outputs averaged with weight w_C.

M_CP = w_C * M_C + (1 - w_C) * M_P for CT+PET input; with one modality the available model is used alone.
As in nnU-Net's ensembling (`nnunetv2.ensembling.ensemble.merge_files`), each model's probabilities come from
its predictor, the label manager turns their average into a segmentation and the plans' image reader-writer
writes it. Only the average is done here: nnU-Net's `average_probabilities` weighs every model equally.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from nnunetv2_pemma.errors import PlansError
from nnunetv2_pemma.inference.inputs import input_cases, refuse_existing_predictions
from nnunetv2_pemma.inference.predictor import build_predictor, model_folder_of

if TYPE_CHECKING:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

FILE_ENDING = ".nii.gz"


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


def _probabilities(predictor: nnUNetPredictor, image: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """One model's probabilities for a one-channel image, in the image's grid, and the image's properties."""
    data, properties = predictor.plans_manager.image_reader_writer_class().read_images([str(image)])
    _, probabilities = predictor.predict_single_npy_array(data, properties, None, None, True)
    return probabilities, properties


def predict_late_fusion(input_dir: Path, output_dir: Path, modalities: Sequence[str], ct_model: ModelRef | None,
                        pet_model: ModelRef | None, w_ct: float = 0.5, device: str = "cpu", tta: bool = True,
                        overwrite: bool = False) -> list[Path]:
    """Segment every case of `input_dir` (channels = `modalities`, in order) by late fusion; predictions already
    in `output_dir` are only replaced with `overwrite`."""
    modalities = [m.upper() for m in modalities]
    if not 0.0 <= w_ct <= 1.0:
        raise PlansError(f"--w-ct must lie in [0, 1], got {w_ct}")
    models = {"CT": ct_model, "PET": pet_model}
    absent = [m for m in modalities if models.get(m, 0) is None]
    if absent or not set(modalities) <= {"CT", "PET"} or not modalities:
        raise PlansError(f"--modalities {modalities}: late fusion needs CT and/or PET, each with its model "
                         f"(--ct-model / --pet-model)")
    cases = input_cases(input_dir, modalities, FILE_ENDING)
    refuse_existing_predictions(output_dir, cases, overwrite, FILE_ENDING)
    weights = {"CT": w_ct, "PET": 1.0 - w_ct} if len(modalities) == 2 else {modalities[0]: 1.0}
    predictors = {m: build_predictor(models[m].folder(), models[m].folds, None, device=device, tta=tta)
                  for m in modalities}
    first = predictors[modalities[0]]
    writer = first.plans_manager.image_reader_writer_class()
    output_dir.mkdir(parents=True, exist_ok=True)
    for case in cases:
        outputs = {m: _probabilities(predictors[m], input_dir / f"{case}_{i:04d}{FILE_ENDING}")
                   for i, m in enumerate(modalities)}
        shapes = [p.shape for p, _ in outputs.values()]
        if len(set(shapes)) > 1:
            raise PlansError(f"case {case}: CT and PET models predict different shapes {shapes[0]} vs {shapes[1]} "
                             f"(different labels or input grids)")
        fused = sum(weights[m] * p for m, (p, _) in outputs.items())
        writer.write_seg(first.label_manager.convert_probabilities_to_segmentation(fused),
                         str(output_dir / f"{case}{FILE_ENDING}"), outputs[modalities[0]][1])
    return [output_dir / f"{c}{FILE_ENDING}" for c in cases]
