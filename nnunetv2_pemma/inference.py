"""`pemma predict`: nnU-Net's predictor with a choice of input modalities and crop restoration.

A PEMMA model has modality slots (CT, PET). Inference with a subset (C or P from a CP model) rewrites the plans
the predictor sees: channel names, per-channel normalisation and the network's input modalities follow the
files given; the network fills the absent modality itself, in normalised space.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from nnunetv2_pemma.errors import PlansError
from nnunetv2_pemma.plans import PEMMA_KEY, channel_modalities


def plans_for_modalities(plans: dict[str, Any], dataset_json: dict[str, Any], configuration: str,
                         modalities: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Plans and dataset.json for input files that hold `modalities` (in channel order).

    Normalisation of each modality comes from the "pemma" block's record of what the model was adapted with, so
    a model last updated on CT alone still takes PET.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    resolved = PlansManager(plans).get_configuration(configuration).configuration
    if PEMMA_KEY not in resolved:
        raise PlansError(f"configuration {configuration} is not a PEMMA configuration")
    known = resolved[PEMMA_KEY].get("modality_normalization", {})
    modalities = [m.upper() for m in modalities]
    if not modalities or len(set(modalities)) != len(modalities) or not set(modalities) <= known.keys():
        raise PlansError(f"--modalities {modalities}: this model knows {sorted(known)}; give a non-empty subset "
                         f"without repeats, in the order of the input files' channels")
    plans, dataset_json = copy.deepcopy(plans), copy.deepcopy(dataset_json)
    plans["foreground_intensity_properties_per_channel"] = {str(i): known[m]["properties"]
                                                            for i, m in enumerate(modalities)}
    cfg = plans["configurations"][configuration]
    cfg["normalization_schemes"] = [known[m]["scheme"] for m in modalities]
    cfg["use_mask_for_norm"] = [False] * len(modalities)
    cfg[PEMMA_KEY] = {**resolved[PEMMA_KEY], "input_modalities": modalities}
    dataset_json["channel_names"] = {str(i): m for i, m in enumerate(modalities)}
    return plans, dataset_json


def build_predictor(model_folder: Path, folds: Sequence[int | str], modalities: Sequence[str] | None,
                    checkpoint_name: str = "checkpoint_final.pth", device: str = "cpu", tta: bool = True,
                    missing_modality: str | None = None):
    """An initialised nnUNetPredictor for the model in `model_folder`, fed `modalities` (default: as trained).

    missing_modality: override how a PEMMA network fills an absent modality ("zero" or "drop").
    """
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = json.loads((model_folder / "plans.json").read_text())
    dataset_json = json.loads((model_folder / "dataset.json").read_text())
    checkpoints = []
    for f in folds:
        path = model_folder / f"fold_{f}" / checkpoint_name
        if not path.is_file():
            raise PlansError(f"no checkpoint {path}")
        checkpoints.append(torch.load(path, map_location="cpu", weights_only=False))
    configuration = checkpoints[0]["init_args"]["configuration"]
    trainer_name = checkpoints[0]["trainer_name"]
    if modalities is not None and [m.upper() for m in modalities] != channel_modalities(dataset_json):
        plans, dataset_json = plans_for_modalities(plans, dataset_json, configuration, modalities)
    if missing_modality is not None:
        block = plans["configurations"][configuration].get(PEMMA_KEY)
        if block is None or "missing_modality" not in block["adaptation"]:
            raise PlansError(f"--missing-modality applies to PEMMA models; {trainer_name} is not one")
        block["adaptation"]["missing_modality"] = missing_modality
    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    trainer_class = recursive_find_trainer_class_by_name(trainer_name)
    network = trainer_class.build_network_architecture(
        plans_manager, configuration_manager,
        determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
    if modalities is not None and not hasattr(network, "set_input_modalities"):
        trained = channel_modalities(json.loads((model_folder / "dataset.json").read_text()))
        raise PlansError(f"{trainer_name} builds a network without modality slots; it takes exactly the channels "
                         f"it was trained with: {trained}")
    predictor = nnUNetPredictor(use_mirroring=tta, device=torch.device(device), verbose=False,
                                verbose_preprocessing=False, allow_tqdm=True)
    predictor.manual_initialization(network, plans_manager, configuration_manager,
                                    [c["network_weights"] for c in checkpoints], dataset_json, trainer_name,
                                    checkpoints[0].get("inference_allowed_mirroring_axes"))
    return predictor


def model_folder_of(dataset: str | int, trainer: str, configuration: str, plans_identifier: str) -> Path:
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    return Path(get_output_folder(dataset, trainer, plans_identifier, configuration))


def predict(input_dir: Path, output_dir: Path, dataset: str | int, configuration: str, trainer: str,
            folds: Sequence[int | str], modalities: Sequence[str] | None = None,
            plans_identifier: str = "nnUNetPlans", checkpoint_name: str = "checkpoint_final.pth",
            device: str = "cpu", tta: bool = True, crop_records: Path | None = None,
            missing_modality: str | None = None, num_processes: int = 3) -> list[Path]:
    """Predict every case in `input_dir`; with `crop_records`, put the masks back into the original CT grid.

    num_processes: nnU-Net's preprocessing and export workers; 0 predicts in this process (quicker for a few
    cases, since each worker imports torch again).
    """
    model_folder = model_folder_of(dataset, trainer, configuration, plans_identifier)
    predictor = build_predictor(model_folder, folds, modalities, checkpoint_name, device, tta, missing_modality)
    target = output_dir if crop_records is None else output_dir / "cropped_grid"
    target.mkdir(parents=True, exist_ok=True)
    if num_processes == 0:
        predictor.predict_from_files_sequential(str(input_dir), str(target), save_probabilities=False, overwrite=True)
    else:
        predictor.predict_from_files(str(input_dir), str(target), save_probabilities=False, overwrite=True,
                                     num_processes_preprocessing=num_processes,
                                     num_processes_segmentation_export=num_processes)
    written = sorted(target.glob("*.nii.gz"))
    if crop_records is None:
        return written
    from nnunetv2_pemma.data.geometry import load_crop_records, restore_to_original

    records = load_crop_records(crop_records if crop_records.is_dir() else crop_records.parent)
    restored = []
    for pred in written:
        case = pred.name[:-len(".nii.gz")]
        if case not in records:
            raise PlansError(f"no crop record for case {case} in {crop_records}")
        restore_to_original(pred, records[case], output_dir / pred.name)
        restored.append(output_dir / pred.name)
    return restored
