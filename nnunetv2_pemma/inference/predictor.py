"""`pemma predict`: nnU-Net's predictor with a choice of input modalities and crop restoration.

A PEMMA model has modality slots (CT, PET). nnU-Net initialises the predictor from the model folder as trained;
inference with a subset (C or P from a CP model) or another missing-modality mode then swaps in rewritten plans
(`modalities.plans_for_modalities`) and a network the trainer builds from them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from nnunetv2_pemma.adaptation.provenance import BASE_FILE_KEY, FINGERPRINT_KEY, PEMMA_BASE_KEY, base_fingerprint
from nnunetv2_pemma.errors import CheckpointError, PlansError
from nnunetv2_pemma.inference.inputs import input_cases, refuse_existing_predictions
from nnunetv2_pemma.inference.modalities import plans_for_modalities
from nnunetv2_pemma.networks.peers.specs import SliceInteractionSpec
from nnunetv2_pemma.plans import PEMMA_KEY, channel_modalities

if TYPE_CHECKING:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor


def build_predictor(model_folder: Path, folds: Sequence[int | str], modalities: Sequence[str] | None,
                    checkpoint_name: str = "checkpoint_final.pth", device: str = "cpu", tta: bool = True,
                    missing_modality: str | None = None) -> nnUNetPredictor:
    """An initialised nnUNetPredictor for the model in `model_folder`, fed `modalities` (default: as trained).

    missing_modality: override how a PEMMA network fills an absent modality ("zero" or "drop").
    """
    from nnunetv2_pemma.inference.cpu_patches import CPUFriendlyPredictor
    from nnunetv2_pemma.inference.slice_stack_predictor import SliceStackPredictor

    checkpoints = [Path(model_folder) / f"fold_{f}" / checkpoint_name for f in folds]
    for path in checkpoints:  # nnU-Net would stop with a traceback
        if not path.is_file():
            raise PlansError(f"no checkpoint {path}")
    options = dict(use_mirroring=tta, device=torch.device(device), verbose=False, verbose_preprocessing=False,
                   allow_tqdm=True)
    slices = _neighbour_slices(Path(model_folder))
    predictor = CPUFriendlyPredictor(**options) if slices is None else SliceStackPredictor(slices=slices, **options)
    predictor.initialize_from_trained_model_folder(str(model_folder), tuple(folds), checkpoint_name)
    records = [torch.load(path, map_location="cpu", weights_only=False, mmap=True)["init_args"] for path in checkpoints]
    for path, init_args, weights in zip(checkpoints, records, predictor.list_of_parameters):
        _check_base(path, init_args, weights)
    new_inputs = modalities is not None and [m.upper() for m in modalities] != channel_modalities(
        predictor.dataset_json)
    if not new_inputs and missing_modality is None:
        return predictor
    configuration = records[0]["configuration"]  # nnUNetPredictor keeps no configuration name; the checkpoint does
    plans, dataset_json = copy.deepcopy(predictor.plans_manager.plans), predictor.dataset_json
    if new_inputs:
        trained = channel_modalities(dataset_json)
        plans, dataset_json = plans_for_modalities(plans, dataset_json, configuration, modalities)
        if not hasattr(predictor.network, "set_input_modalities"):
            raise PlansError(f"{predictor.trainer_name} builds a network without modality slots; it takes exactly "
                             f"the channels it was trained with: {trained}")
    if missing_modality is not None:
        block = plans["configurations"][configuration].get(PEMMA_KEY)
        if block is None or "missing_modality" not in block["adaptation"]:
            raise PlansError(f"--missing-modality applies to PEMMA models; {predictor.trainer_name} is not one")
        block["adaptation"]["missing_modality"] = missing_modality
    _use_plans(predictor, plans, dataset_json, configuration)
    return predictor


def _neighbour_slices(model_folder: Path) -> int | None:
    """How many neighbouring slices of each modality a 2.5D model takes (from its plans.json), or None."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    configuration = model_folder.name.split("__")[-1]  # nnU-Net's TRAINER__PLANS__CONFIGURATION folder
    plans = json.loads((model_folder / "plans.json").read_text())
    if configuration not in plans["configurations"]:
        return None
    block = PlansManager(plans).get_configuration(configuration).configuration.get(PEMMA_KEY)
    model = block["model"] if block else {}
    return model.get("slices") if model.get("architecture") == SliceInteractionSpec.architecture else None


def _check_base(checkpoint: Path, init_args: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
    """A PEMMA checkpoint whose frozen base is not the CT base its adapters were trained on (weights edited or
    copied in by hand) gives a silently different model: refuse it."""
    record = init_args.get(PEMMA_BASE_KEY)
    if record and base_fingerprint(weights) != record[FINGERPRINT_KEY]:
        raise CheckpointError(f"{checkpoint}: its base tensors differ from the CT base its adapters were trained on "
                              f"({record.get(BASE_FILE_KEY)}); rebuild it with `pemma apply-adapter` from that base")


def _use_plans(predictor: nnUNetPredictor, plans: dict[str, Any], dataset_json: dict[str, Any],
               configuration: str) -> None:
    """Re-initialise `predictor` with rewritten plans and a network its trainer builds from them.

    nnU-Net lacks a hook here: initialize_from_trained_model_folder reads plans.json and dataset.json from the
    folder and builds the network right away, and a PEMMA trainer's static build_network_architecture takes the
    input modalities and missing-modality mode from the plans. So the network is built once more, the way that
    method builds it, and handed to manual_initialization with the weights nnU-Net already loaded.
    """
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    network = recursive_find_trainer_class_by_name(predictor.trainer_name).build_network_architecture(
        plans_manager, configuration_manager,
        determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
    network.load_state_dict(predictor.list_of_parameters[0])  # a network that does not fit fails here
    predictor.manual_initialization(network, plans_manager, configuration_manager, predictor.list_of_parameters,
                                    dataset_json, predictor.trainer_name, predictor.allowed_mirroring_axes)


def run_predictor(predictor: nnUNetPredictor, input_dir: Path, output_dir: Path, cases: Sequence[str],
                  channels: int, num_processes: int = 0) -> None:
    """nnU-Net's predictor on `cases` (`{case}_0000.nii.gz`... in `input_dir`) into `output_dir`; a centre-routed
    mixture of adapters predicts centre by centre, each routed to its centre's expert. num_processes 0: in this
    process (quicker for a few cases: each worker imports torch again)."""
    for center, group in _center_groups(predictor.network, cases):
        if center is not None:
            predictor.network.set_centers(center)
        inputs = [[str(input_dir / f"{case}_{c:04d}.nii.gz") for c in range(channels)] for case in group]
        outputs = [str(output_dir / case) for case in group]
        if num_processes == 0:
            predictor.predict_from_files_sequential(inputs, outputs, save_probabilities=False, overwrite=True)
        else:
            predictor.predict_from_files(inputs, outputs, save_probabilities=False, overwrite=True,
                                         num_processes_preprocessing=num_processes,
                                         num_processes_segmentation_export=num_processes)


def _center_groups(network: torch.nn.Module, cases: Sequence[str]) -> list[tuple[str | None, list[str]]]:
    """The cases by centre for a centre-routed mixture of adapters, which routes each case to its centre's expert
    (nnU-Net's predictor passes the network images only, so each centre is predicted as one group); else one group.
    """
    adaptation = getattr(network, "adaptation", None)
    if adaptation is None or adaptation.method != "moa" or adaptation.moa_routing != "center":
        return [(None, list(cases))]
    from nnunetv2_pemma.data.centers import center_of

    groups: dict[str, list[str]] = {}
    for case in cases:
        groups.setdefault(center_of(case), []).append(case)
    return sorted(groups.items())


def model_folder_of(dataset: str | int, trainer: str, configuration: str, plans_identifier: str) -> Path:
    """nnU-Net's results folder of a trained model."""
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    return Path(get_output_folder(dataset, trainer, plans_identifier, configuration))


def predict(input_dir: Path, output_dir: Path, dataset: str | int, configuration: str, trainer: str,
            folds: Sequence[int | str], modalities: Sequence[str] | None = None,
            plans_identifier: str = "nnUNetPlans", checkpoint_name: str = "checkpoint_final.pth",
            device: str = "cpu", tta: bool = True, crop_records: Path | None = None,
            missing_modality: str | None = None, num_processes: int = 3, overwrite: bool = False) -> list[Path]:
    """Predict every case in `input_dir`; with `crop_records`, put the masks back into the original CT grid.

    The input files and the output folder are checked before nnU-Net writes anything: every case must have one
    file per modality, and predictions already in `output_dir` are only replaced with `overwrite`.
    num_processes: nnU-Net's preprocessing and export workers; 0 predicts in this process (quicker for a few
    cases, since each worker imports torch again).
    """
    model_folder = model_folder_of(dataset, trainer, configuration, plans_identifier)
    if not (model_folder / "dataset.json").is_file():
        raise PlansError(f"no trained model in {model_folder} (no dataset.json): check -d, -tr, -c and -p")
    trained = channel_modalities(json.loads((model_folder / "dataset.json").read_text()))
    cases = input_cases(input_dir, [m.upper() for m in modalities] if modalities else trained)
    refuse_existing_predictions(output_dir, cases, overwrite)
    predictor = build_predictor(model_folder, folds, modalities, checkpoint_name, device, tta, missing_modality)
    target = output_dir if crop_records is None else output_dir / "cropped_grid"
    target.mkdir(parents=True, exist_ok=True)
    run_predictor(predictor, input_dir, target, cases, len(modalities) if modalities else len(trained),
                  num_processes)
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
