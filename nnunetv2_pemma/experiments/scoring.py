"""Table 2's numbers for a run of the protocol: every model predicts its stage's fold-0 validation cases with CP, C
and P input (PEMMA also with the absent modality's tokens dropped), and the predictions are scored with Dice.
Predictions already on disk are kept, so a stopped scoring resumes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nnunetv2_pemma.experiments.protocol import Model, Protocol, nnunet_environment
from nnunetv2_pemma.experiments.table2 import INFER

LABELS = {"GTVp": 1, "GTVn": 2}
DROP = "PEMMA (drop)"  # the PEMMA models, with an absent modality's tokens left out instead of a zero image


def _stage_slug(stage: str) -> str:
    return stage.lower().replace(" ", "_")


def validation_cases(protocol: Protocol, stage: str) -> list[str]:
    """The stage's fold-0 validation cases, from the centre-stratified splits next to the raw CP dataset."""
    from nnunetv2_pemma.data.splits import SPLITS_FILE

    raw = protocol.out / "nnUNet_raw" / protocol.dataset_name(protocol.evaluation_dataset(stage))
    return sorted(json.loads((raw / SPLITS_FILE).read_text())[0]["val"])


def _link_inputs(protocol: Protocol, stage: str, cases: list[str]) -> dict[str, Path]:
    """Per inference setting (CP, C, P), a folder of the stage's validation cases with just those channels, and
    a folder of their reference labels."""
    raw = protocol.out / "nnUNet_raw" / protocol.dataset_name(protocol.evaluation_dataset(stage))
    root = protocol.out / "evaluation" / _stage_slug(stage)
    folders = {infer: root / f"inputs_{infer}" for infer in INFER} | {"gt": root / "reference"}
    for infer, modalities in INFER.items():
        folders[infer].mkdir(parents=True, exist_ok=True)
        for case in cases:
            for i, m in enumerate(modalities):
                link = folders[infer] / f"{case}_{i:04d}.nii.gz"
                if not link.exists():
                    link.symlink_to(raw / "imagesTr" / f"{case}_{('CT', 'PET').index(m):04d}.nii.gz")
    folders["gt"].mkdir(parents=True, exist_ok=True)
    for case in cases:
        link = folders["gt"] / f"{case}.nii.gz"
        if not link.exists():
            link.symlink_to(raw / "labelsTr" / f"{case}.nii.gz")
    return folders


def _predict(protocol: Protocol, model: Model, infer: str, inputs: Path, out: Path, cases: list[str], tta: bool,
             missing_modality: str | None = None) -> None:
    """One model's segmentations of the cases in `inputs` (the channels of `infer`) into `out`."""
    from nnunetv2_pemma.inference.late_fusion import ModelRef, predict_late_fusion
    from nnunetv2_pemma.inference.predictor import build_predictor, model_folder_of, run_predictor

    if model.method == "Late fusion":
        ct = ModelRef(protocol.dataset_name(model.dataset), model.trainer, model.config)
        pet = ModelRef(protocol.dataset_name(model.pet_dataset), "UNETRTrainer", model.pet_config)
        predict_late_fusion(inputs, out, INFER[infer], ct, pet, w_ct=0.5, device=protocol.device, tta=tta,
                            overwrite=True)  # a run interrupted mid-folder is redone
        return
    folder = model_folder_of(protocol.dataset_name(model.dataset), model.trainer, model.config, "nnUNetPlans")
    predictor = build_predictor(folder, [0], list(INFER[infer]),
                                device=protocol.device, tta=tta, missing_modality=missing_modality)
    out.mkdir(parents=True, exist_ok=True)
    run_predictor(predictor, inputs, out, cases, len(INFER[infer]))


def score_models(protocol: Protocol, tta: bool) -> list[dict]:
    """Dice of every model with CP, C and P input on its stage's validation cases (the rows of Table 2)."""
    from nnunetv2_pemma.evaluation.metrics import evaluate_folders

    os.environ.update({k: v for k, v in nnunet_environment(protocol.out, protocol.device).items()
                       if k.startswith("nnUNet_")})
    rows: list[dict] = []
    for model in tqdm(protocol.models, desc="Table 2 inference", unit="model"):
        cases = validation_cases(protocol, model.stage)
        folders = _link_inputs(protocol, model.stage, cases)
        variants = [(model.method, None)] + ([(DROP, "drop")] if model.method == "PEMMA" else [])
        for (method, missing), infer in ((v, i) for v in variants for i in INFER):
            if missing == "drop" and infer == "CP":  # nothing is absent: the same network as PEMMA's CP
                same = next(r for r in rows if (r["method"], r["stage"], r["train"], r["infer"])
                            == (model.method, model.stage, model.train, "CP"))
                rows.append({**same, "method": method})
                continue
            slug = method.replace(" ", "_").replace("(", "").replace(")", "")
            out = protocol.out / "evaluation" / _stage_slug(model.stage) / f"{slug}_{model.train}_{infer}"
            if not all((out / f"{c}.nii.gz").exists() for c in cases):
                _predict(protocol, model, infer, folders[infer], out, cases, tta, missing)
            result = evaluate_folders(out, folders["gt"], LABELS)
            tumour, lymph = (result.mean[label]["dice"] for label in LABELS)
            rows.append({"method": method, "stage": model.stage, "train": model.train, "infer": infer,
                         "cases": len(cases), "Tumor": tumour, "Lymph": lymph,
                         "Avg": float(np.nanmean([tumour, lymph])) if not np.isnan([tumour, lymph]).all() else np.nan,
                         "DSCagg": result.aggregated_dice_mean})
    return rows


def base_validation_dice(protocol: Protocol) -> dict[str, float] | None:
    """The CT base's mean Dice per label on its own fold-0 validation cases, from nnU-Net's validation summary."""
    summary = (protocol.model_folder(501, "UNETRTrainer", protocol.base_config) / "fold_0" / "validation"
               / "summary.json")
    if not summary.is_file():
        return None
    means = json.loads(summary.read_text())["mean"]
    return {name: float(means[str(label)]["Dice"]) for name, label in LABELS.items() if str(label) in means}
