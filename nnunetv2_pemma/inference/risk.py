"""`pemma predict-risk`: a prognosis model's relapse risk for each case of a folder, as a CSV.

Images go through nnU-Net's own preprocessing (the predictor's plans, with any modality subset) and are tiled as
nnU-Net's sliding window tiles them. Each tile gets a log relative hazard from the survival head and a weight, the
number of voxels the model itself segments as lesion in it: the case's risk is the weighted mean over tiles (the
plain mean when nothing is segmented), averaged over folds. Prognosis trainers train the head on patches that hold
a lesion, and a large scan has many tiles without one. A Cox model gives relative risks only, so the CSV holds no
survival curve (that would need a baseline hazard fitted on training cases).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from nnunetv2_pemma.errors import InputDataError, PlansError, warn
from nnunetv2_pemma.inference.inputs import input_cases
from nnunetv2_pemma.inference.predictor import build_predictor, model_folder_of
from nnunetv2_pemma.plans import channel_modalities

RISK_COLUMNS = ("case", "risk", "modalities", "clinical")
TILES_PER_BATCH = 4  # tiles through the network at once: memory, not speed, limits a full-size preset


def _case_risk(network: torch.nn.Module, tiles: torch.Tensor, clinical: torch.Tensor | None) -> float:
    """Lesion-weighted mean of the tiles' log relative hazards (plain mean if no tile holds a segmented lesion)."""
    risks, weights = [], []
    for start in range(0, len(tiles), TILES_PER_BATCH):
        chunk = tiles[start:start + TILES_PER_BATCH]
        network.set_clinical(None if clinical is None else clinical[: len(chunk)])
        logits, risk = network.segment_and_risk(chunk)
        weights.append((logits.argmax(1) > 0).flatten(1).sum(1).float())
        risks.append(risk)
    network.set_clinical(None)
    risks, weights = torch.cat(risks), torch.cat(weights)
    if weights.sum() == 0:
        return risks.mean().item()
    return (risks * weights).sum().item() / weights.sum().item()


def predict_risk(input_dir: Path, output_csv: Path, dataset: str | int, configuration: str, trainer: str,
                 folds: Sequence[int | str], modalities: Sequence[str] | None = None, outcomes: Path | None = None,
                 plans_identifier: str = "nnUNetPlans", checkpoint_name: str = "checkpoint_final.pth",
                 device: str = "cpu", overwrite: bool = False) -> pd.DataFrame:
    """Write `output_csv` (columns case, risk, modalities, clinical) for every case in `input_dir`.

    outcomes: an outcomes.json (or the dataset folder holding it) with the cases' clinical rows, for models that
    take clinical data; by default the model's own dataset's. A case without a row gets the missing-row encoding,
    and the "clinical" column says which cases had one.
    """
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    from nnunetv2_pemma.data.outcomes import dataset_outcomes, load_outcomes

    output_csv = Path(output_csv)
    if output_csv.exists() and not overwrite:
        raise InputDataError(f"{output_csv} already exists; pass --overwrite to replace it")
    model_folder = model_folder_of(dataset, trainer, configuration, plans_identifier)
    if not (model_folder / "dataset.json").is_file():
        raise PlansError(f"no trained model in {model_folder} (no dataset.json): check -d, -tr, -c and -p")
    trained = channel_modalities(json.loads((model_folder / "dataset.json").read_text()))
    used = [m.upper() for m in modalities] if modalities else trained
    cases = input_cases(Path(input_dir), used)
    predictor = build_predictor(model_folder, folds, modalities, checkpoint_name, device, tta=False)
    network = predictor.network
    if not hasattr(network, "segment_and_risk"):
        raise PlansError(f"{trainer} has no survival head; predict-risk takes a prognosis model (SurvivalUNETRTrainer, "
                         f"PEMMASurvivalTrainer, PEMMAClinicalTrainer, EarlyFusionSurvivalTrainer, ...)")
    table = None
    if network.uses_clinical:
        # nnU-Net's results folder: nnUNet_results/<dataset name>/<trainer__plans__configuration>
        table = load_outcomes(Path(outcomes)) if outcomes is not None else dataset_outcomes(model_folder.parent.name)
        unknown = [c for c in cases if c not in table.cases or table.cases[c].clinical is None]
        if unknown:
            warn(f"{len(unknown)} of {len(cases)} case(s) have no clinical row ({', '.join(unknown[:3])}"
                 f"{', ...' if len(unknown) > 3 else ''}): they are scored as cases without clinical data")
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    ending = predictor.dataset_json["file_ending"]
    network = network.to(predictor.device).eval()
    risks = []
    for case in tqdm(cases, desc="risk", unit="case"):
        files = [str(Path(input_dir) / f"{case}_{c:04d}{ending}") for c in range(len(used))]
        data, _, _ = preprocessor.run_case(files, None, predictor.plans_manager, predictor.configuration_manager,
                                           predictor.dataset_json)
        padded, _ = pad_nd_image(torch.from_numpy(data).float(), predictor.configuration_manager.patch_size,
                                 "constant", {"value": 0}, True, None)
        tiles = torch.stack([padded[s] for s in predictor._internal_get_sliding_window_slicers(padded.shape[1:])])
        clinical = None if table is None else torch.from_numpy(table.clinical_vector(case)).to(
            predictor.device).expand(TILES_PER_BATCH, -1)
        per_fold = []
        with torch.no_grad():
            for params in predictor.list_of_parameters:
                network.load_state_dict(params)
                per_fold.append(_case_risk(network, tiles.to(predictor.device), clinical))
        has_row = table is not None and case in table.cases and table.cases[case].clinical is not None
        risks.append({"case": case, "risk": float(np.mean(per_fold)), "modalities": "+".join(used),
                      "clinical": int(has_row)})
    frame = pd.DataFrame(risks, columns=list(RISK_COLUMNS))
    output_csv.parent.mkdir(parents=True, exist_ok=True)
    partial = output_csv.with_name(f".{output_csv.name}.partial")
    frame.to_csv(partial, index=False)
    os.replace(partial, output_csv)
    return frame
