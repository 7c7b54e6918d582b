"""Table 2's numbers for a run of the protocol: every model predicts its stage's evaluation cases (labelled test
cases, or fold 0's validation cases where a dataset has none: `evaluation_cases`) with CP, C and P input (PEMMA
also with the absent modality's tokens dropped), and each prediction is scored with Dice per case. A row keeps its
per-case Dice (for the paired claims) and each metric's mean with a bootstrap interval over the cases.
Predictions already on disk are kept, so a stopped scoring resumes.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nnunetv2_pemma.evaluation.intervals import mean_interval
from nnunetv2_pemma.experiments.evaluation_cases import EvaluationCases, evaluation_cases
from nnunetv2_pemma.experiments.protocol import Model, Protocol, nnunet_environment
from nnunetv2_pemma.experiments.table2 import INFER, METRICS

LABELS = {"GTVp": 1, "GTVn": 2}
METRIC_OF_LABEL = {"GTVp": "Tumor", "GTVn": "Lymph"}
DROP = "PEMMA (drop)"  # the PEMMA models, with an absent modality's tokens left out instead of a zero image


def _slug(text: str) -> str:
    return text.lower().replace(" ", "_").replace("(", "").replace(")", "")


def _model_slug(model: Model, missing: str | None) -> str:
    """A prediction folder's name: the model itself (trainer, dataset, configuration; late fusion's PET model),
    so that two rows of one model (PEMMA-input-skip's adaptation stage is PEMMA's) share its predictions."""
    parts = [model.trainer, str(model.dataset), model.config]
    if model.pet_dataset is not None:
        parts += ["pet", str(model.pet_dataset), str(model.pet_config)]
    return "_".join(parts + ([missing] if missing else []))


def stage_cases(protocol: Protocol, stage: str) -> EvaluationCases:
    """The cases a stage's models are scored on, from the stage's CT+PET raw dataset."""
    return evaluation_cases(protocol.out / "nnUNet_raw" / protocol.dataset_name(protocol.evaluation_dataset(stage)))


def link_inputs(root: Path, scored: EvaluationCases, settings: Sequence[str] = tuple(INFER)) -> dict[str, Path]:
    """Per inference setting (CP, C, P by default), a folder under ROOT of the cases with just those channels (the
    raw dataset's channel 0 is CT, 1 PET), and "gt", a folder of their reference labels. Links already there stay
    (a resumed run)."""
    folders = {infer: root / f"inputs_{infer}" for infer in settings} | {"gt": root / "reference"}
    links = {(folders["gt"] / f"{case}.nii.gz"): scored.labels / f"{case}.nii.gz" for case in scored.cases}
    for infer in settings:
        for case in scored.cases:
            for i, m in enumerate(INFER[infer]):
                source = scored.images / f"{case}_{('CT', 'PET').index(m):04d}.nii.gz"
                links[folders[infer] / f"{case}_{i:04d}.nii.gz"] = source
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    for link, source in links.items():
        if not link.is_symlink():
            link.symlink_to(source)
    return folders


def _predict(protocol: Protocol, model: Model, infer: str, inputs: Path, out: Path, cases: list[str], tta: bool,
             missing_modality: str | None = None) -> None:
    """One model's segmentations of the cases in `inputs` (the channels of `infer`) into `out`."""
    from nnunetv2_pemma.inference.late_fusion import ModelRef, predict_late_fusion
    from nnunetv2_pemma.inference.predictor import build_predictor, model_folder_of, run_predictor

    if model.method == "Late fusion":
        ct = ModelRef(protocol.dataset_name(model.dataset), model.trainer, model.config)
        pet = ModelRef(protocol.dataset_name(model.pet_dataset), model.pet_trainer, model.pet_config)
        predict_late_fusion(inputs, out, INFER[infer], ct, pet, w_ct=0.5, device=protocol.device, tta=tta,
                            overwrite=True)  # a run interrupted mid-folder is redone
        return
    folder = model_folder_of(protocol.dataset_name(model.dataset), model.trainer, model.config, "nnUNetPlans")
    predictor = build_predictor(folder, [0], list(INFER[infer]),
                                device=protocol.device, tta=tta, missing_modality=missing_modality)
    out.mkdir(parents=True, exist_ok=True)
    run_predictor(predictor, inputs, out, cases, len(INFER[infer]))


def scored_row(prediction: Path, reference: Path, **keys: object) -> dict:
    """A row of `keys` with the per-case Dice of a prediction folder ("per_case": case -> metric -> Dice) and each
    metric's mean and bootstrap interval over the cases (Avg: per case, the mean of the labels it defines)."""
    from nnunetv2_pemma.evaluation.metrics import evaluate_folders

    result = evaluate_folders(prediction, reference, LABELS)
    per_case = {}
    for entry in result.per_case:
        dice = {METRIC_OF_LABEL[label]: float(entry[label]["dice"]) for label in LABELS}
        defined = [v for v in dice.values() if not np.isnan(v)]
        per_case[entry["case"]] = {**dice, "Avg": float(np.mean(defined)) if defined else float("nan")}
    return {**keys, "cases": len(per_case), **interval_columns(per_case), "DSCagg": result.aggregated_dice_mean,
            "per_case": per_case}


def interval_columns(per_case: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over the cases, and its 95 % bootstrap interval (`<metric>_low`, `<metric>_high`)."""
    out = {}
    for metric in METRICS:
        estimate = mean_interval([scores[metric] for scores in per_case.values()])
        out |= {metric: estimate.mean, f"{metric}_low": estimate.low, f"{metric}_high": estimate.high}
    return out


@dataclass(frozen=True)
class PredictionTask:
    """One model's segmentations of one input setting (`infer`) of the cases in `inputs`, into `out`."""

    model: Model
    infer: str
    inputs: Path
    out: Path
    cases: tuple[str, ...]
    missing: str | None = None  # PEMMA's absent-modality mode override ("drop")


def _run(protocol: Protocol, task: PredictionTask, tta: bool) -> None:
    _predict(protocol, task.model, task.infer, task.inputs, task.out, list(task.cases), tta, task.missing)


def _one_thread(environment: dict[str, str]) -> None:
    import torch

    os.environ.update(environment)
    torch.set_num_threads(1)


def run_predictions(protocol: Protocol, tasks: list[PredictionTask], tta: bool, workers: int = 1) -> None:
    """Run the tasks whose predictions are not all on disk: in this process, or on CPU in `workers` processes
    of one thread each (nnU-Net predicts a case at a time, on one core)."""
    pending = [t for t in tasks if not all((t.out / f"{c}.nii.gz").exists() for c in t.cases)]
    if workers <= 1 or protocol.device != "cpu" or len(pending) < 2:
        for task in tqdm(pending, desc="Table 2 inference", unit="model"):
            _run(protocol, task, tta)
        return
    environment = {k: v for k, v in os.environ.items() if k.startswith("nnUNet_")}
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread,
                             initargs=(environment,)) as pool:
        futures = [pool.submit(_run, protocol, task, tta) for task in pending]
        for future in tqdm(as_completed(futures), total=len(futures), desc="Table 2 inference", unit="model"):
            future.result()


def score_models(protocol: Protocol, tta: bool, workers: int = 1) -> list[dict]:
    """Dice of every model with CP, C and P input on its stage's evaluation cases (the rows of Table 2); the
    predictions run in `workers` processes on CPU."""
    os.environ.update({k: v for k, v in nnunet_environment(protocol.out, protocol.device).items()
                       if k.startswith("nnUNet_")})
    inputs: dict[str, tuple[EvaluationCases, dict[str, Path]]] = {}
    cells: list[tuple[dict, PredictionTask | None]] = []  # row keys, and the prediction that scores them
    for model in protocol.models:
        if model.stage not in inputs:
            scored = stage_cases(protocol, model.stage)
            inputs[model.stage] = scored, link_inputs(protocol.out / "evaluation" / _slug(model.stage), scored)
        scored, folders = inputs[model.stage]
        variants = [(model.method, None)] + ([(DROP, "drop")] if model.method == "PEMMA" else [])
        for (method, missing), infer in ((v, i) for v in variants for i in INFER):
            keys = {"method": method, "stage": model.stage, "train": model.train, "infer": infer,
                    "scored_on": scored.kind}
            if missing == "drop" and infer == "CP":  # nothing is absent: the same network as PEMMA's CP
                cells.append((keys, None))
                continue
            out = protocol.out / "evaluation" / _slug(model.stage) / f"{_model_slug(model, missing)}_{infer}"
            cells.append((keys, PredictionTask(model, infer, folders[infer], out, scored.cases, missing)))
    tasks = {task.out: task for _, task in cells if task is not None}  # rows of one model share its predictions
    run_predictions(protocol, list(tasks.values()), tta, workers)
    rows: list[dict] = []
    for keys, task in cells:
        if task is None:
            same = next(r for r in rows if (r["method"], r["stage"], r["train"], r["infer"])
                        == ("PEMMA", keys["stage"], keys["train"], "CP"))
            rows.append({**same, "method": keys["method"]})
        else:
            rows.append(scored_row(task.out, inputs[keys["stage"]][1]["gt"], **keys))
    return rows


def score_base(protocol: Protocol, tta: bool, workers: int = 1) -> dict:
    """The CT base with CT input on its own dataset's evaluation cases (the pre-training centres' labelled test
    cases): the row the claim "the CT base learned both classes" is decided on."""
    os.environ.update({k: v for k, v in nnunet_environment(protocol.out, protocol.device).items()
                       if k.startswith("nnUNet_")})
    scored = evaluation_cases(protocol.out / "nnUNet_raw" / protocol.dataset_name(501))
    root = protocol.out / "evaluation" / "ct_base"
    folders = link_inputs(root, scored, ("C",))  # a CT-only dataset
    base = Model("CT base", "Pre-training", "C", 501, protocol.trainers.base, protocol.base_config)
    # the base's cases split in halves, one per worker
    halves = [scored.cases[k::max(workers, 1)] for k in range(max(workers, 1))]
    tasks = [PredictionTask(base, "C", folders["C"], root / "ct_base_C", half) for half in halves if half]
    run_predictions(protocol, tasks, tta, workers)
    return scored_row(root / "ct_base_C", folders["gt"], method="CT base", stage="Pre-training", train="C",
                      infer="C", scored_on=scored.kind)
