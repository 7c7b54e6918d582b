"""Plans presets: transformer configurations merged into nnU-Net plans.

A preset (`plans/<name>.json`) holds the model, adaptation and schedule hyper-parameters. `add_preset` stores
them in a new configuration of the dataset's plans, under the key "pemma", so trainers read them from the plans
and `nnUNetv2_predict` rebuilds exactly the trained network from nnU-Net's own `plans.json`.

PET normalisation (deliberate): nnU-Net z-scores every channel not named "CT" per image, which throws away
absolute SUV (a lesion of SUV 12 in a hot patient would look like one of SUV 4 in a cold one). PEMMA
configurations normalise PET globally instead, with nnU-Net's CTNormalization class fed a PET window:
clip SUV to [0, foreground p99.5] and subtract/divide by the foreground mean/std of the dataset's fingerprint.
Equal SUV therefore means equal network input across cases and centres.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from nnunetv2_pemma.config import PEMMA_KEY, Preset
from nnunetv2_pemma.environment import preset_folder
from nnunetv2_pemma.errors import PlansError, warn
from nnunetv2_pemma.networks.peers.specs import NNUNetSpec
from nnunetv2_pemma.worker_pools import preprocessing_in_threads

__all__ = ["PEMMA_KEY", "add_preset", "channel_modalities", "load_preset", "preset_names", "transfer_plans"]

PET_NORMALIZATION = "CTNormalization"


def preset_names() -> list[str]:
    return sorted(p.stem for p in preset_folder().glob("*.json"))


def load_preset(name_or_path: str) -> Preset:
    """A preset by name (`plans/<name>.json`, installed as nnunetv2_pemma.presets) or by path, parsed and checked."""
    path = Path(name_or_path)
    if not path.suffix == ".json":
        path = preset_folder() / f"{name_or_path}.json"
    if not path.is_file():
        raise PlansError(f"unknown preset '{name_or_path}': no file {path}; available: {', '.join(preset_names())}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PlansError(f"preset {path}: not valid JSON ({e})") from None
    return Preset.parse(raw, path.stem, str(path))


def _preprocessed_dir(dataset: str | int) -> tuple[str, Path]:
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if not nnUNet_preprocessed.is_set():
        raise PlansError("nnUNet_preprocessed is not set: export nnUNet_raw, nnUNet_preprocessed and nnUNet_results")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError as e:
        raise PlansError(f"dataset {dataset}: {e}") from None
    return name, Path(nnUNet_preprocessed.get()) / name


def _raw_dir(dataset_name: str) -> Path:
    from nnunetv2.paths import nnUNet_raw

    if not nnUNet_raw.is_set():
        raise PlansError("nnUNet_raw is not set")
    return Path(nnUNet_raw.get()) / dataset_name


def _load_plans(folder: Path, plans_identifier: str) -> dict[str, Any]:
    plans_file = folder / f"{plans_identifier}.json"
    if not plans_file.is_file():
        dataset_id = int(folder.name[len("Dataset"):len("Dataset") + 3])  # nnU-Net's -d takes the number
        raise PlansError(f"no plans at {plans_file}: run `nnUNetv2_plan_and_preprocess -d {dataset_id} "
                         f"-c 3d_fullres` first")
    return json.loads(plans_file.read_text())


def _save_json(obj: Any, path: Path) -> None:
    """Write through a temporary file so a crash never leaves a truncated plans file behind."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def channel_modalities(dataset_json: dict[str, Any]) -> list[str]:
    """Modality of each input channel, from dataset.json's channel names (CT, PET)."""
    names = [dataset_json["channel_names"][k] for k in sorted(dataset_json["channel_names"], key=int)]
    unknown = [n for n in names if n.upper() not in ("CT", "PET")]
    if unknown:
        raise PlansError(f"channel names {names}: PEMMA configurations need channels named CT and/or PET "
                         f"(convert with `pemma convert-hecktor`)")
    return [n.upper() for n in names]


def pet_window(foreground_properties: dict[str, float], dataset_name: str) -> dict[str, float]:
    """CTNormalization properties for PET: clip SUV to [0, foreground p99.5], then foreground mean/std.

    A dataset whose PETs are zero under the tumour (all-zero PET files, PET outside the labelled region) gets a
    degenerate window: possible, so a warning, but PET then carries nothing for the network to learn from.
    """
    window = dict(foreground_properties)
    window["percentile_00_5"] = 0.0
    if not window["percentile_99_5"] > 0 or not window["std"] > 0:
        warn(f"{dataset_name}: degenerate PET window [0, {window['percentile_99_5']:g}] SUV with std "
             f"{window['std']:g} under the labels (are its PET images all zero?); PET will carry no signal")
    return window


def _set_channel_normalisation(configuration: dict[str, Any], schemes: list[str]) -> None:
    configuration["normalization_schemes"] = schemes
    configuration["use_mask_for_norm"] = [False] * len(schemes)


def _architecture_block(preset: Preset) -> dict[str, Any] | None:
    """nnU-Net's "architecture" entry naming the network the trainers build (MONAI's UNETR/SwinUNETR, H2ASeg), or
    None for nnU-Net's own U-Net of the inherited configuration (whose planned entry then stays)."""
    if preset.model.network_class_name is None:
        return None
    kwargs = preset.model.to_json()
    kwargs.pop("architecture")
    return {"network_class_name": preset.model.network_class_name, "arch_kwargs": kwargs, "_kw_requires_import": []}


def modality_normalization(plans: dict[str, Any], configuration: str, modalities: list[str]
                           ) -> dict[str, dict[str, Any]]:
    """Per modality, the normalisation scheme and statistics its channel gets in `configuration`.

    Stored in the "pemma" block so a model can later be fed a modality its last training dataset lacked
    (P or CP inference after a CT-only continual update) with the statistics it was adapted with.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    resolved = PlansManager(plans).get_configuration(configuration).configuration
    props = plans["foreground_intensity_properties_per_channel"]
    return {m: {"scheme": resolved["normalization_schemes"][i], "properties": props[str(i)]}
            for i, m in enumerate(modalities)}


def _write_splits(dataset_name: str, preprocessed: Path) -> str:
    from nnunetv2_pemma.data.splits import write_splits_to_preprocessed

    written = write_splits_to_preprocessed(_raw_dir(dataset_name), preprocessed)
    return "centre-stratified splits_final.json written" if written else "no centre-stratified splits (nnU-Net's own)"


def _preprocess(dataset_name: str, plans_identifier: str, configuration: str, num_processes: int) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset
    from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id

    with preprocessing_in_threads(num_processes):
        preprocess_dataset(convert_dataset_name_to_id(dataset_name), plans_identifier, [configuration],
                           [num_processes])


def _fingerprint_is_current(raw: Path, fingerprint: Path) -> bool:
    """Whether FINGERPRINT was written after every file of the raw dataset RAW (dataset.json, images, labels): a
    second preset transferred to the same dataset reuses it instead of reading every case again."""
    if not fingerprint.is_file():
        return False
    written = fingerprint.stat().st_mtime
    return all(f.stat().st_mtime < written for f in raw.rglob("*") if f.is_file())


def _extract_fingerprint(dataset_name: str, target_folder: Path, num_processes: int) -> dict[str, Any]:
    """TARGET's dataset fingerprint (nnU-Net's, after its dataset check), extracted again only when the raw
    dataset changed since the last one."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset
    from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id

    fingerprint = target_folder / "dataset_fingerprint.json"
    if not _fingerprint_is_current(_raw_dir(dataset_name), fingerprint):
        with preprocessing_in_threads(num_processes):
            extract_fingerprint_dataset(convert_dataset_name_to_id(dataset_name), num_processes=num_processes,
                                        check_dataset_integrity=True, clean=True, verbose=False)
    return json.loads(fingerprint.read_text())


def add_preset(dataset: str | int, preset_name: str, plans_identifier: str = "nnUNetPlans",
               num_processes: int = 1, overwrite: bool = False) -> str:
    """Add the preset's configuration to the dataset's plans; returns a one-line summary.

    Adding the same preset again rewrites the same configuration; replacing a configuration of that name that
    differs (another preset or preset version) needs `overwrite`.

    CT-only data reuses 3d_fullres's preprocessed files (no re-preprocessing). Data with a PET channel needs its
    own preprocessed copy because PET is normalised differently (module docstring); that is run here.
    """
    preset = load_preset(preset_name)
    name, folder = _preprocessed_dir(dataset)
    plans = _load_plans(folder, plans_identifier)
    parent = preset.inherits_from
    if parent not in plans["configurations"]:
        raise PlansError(f"{folder / plans_identifier}.json has no '{parent}' configuration to inherit from")
    modalities = channel_modalities(json.loads((folder / "dataset.json").read_text()))
    config_name = preset.configuration
    configuration: dict[str, Any] = {"inherits_from": parent, "patch_size": list(preset.patch_size),
                                     "batch_size": preset.batch_size,
                                     PEMMA_KEY: preset.block(tuple(modalities)).to_json()}
    architecture = _architecture_block(preset)
    if architecture is None and isinstance(preset.model, NNUNetSpec):  # the parent's entry, inherited or its own
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        planned = PlansManager(plans).get_configuration(parent).configuration["architecture"]
        architecture = preset.model.narrowed(planned)
    if architecture is not None:
        configuration["architecture"] = architecture
    needs_preprocessing = "PET" in modalities
    if needs_preprocessing:
        parent_schemes = plans["configurations"][parent]["normalization_schemes"]
        _set_channel_normalisation(configuration, [PET_NORMALIZATION if m == "PET" else s
                                                   for m, s in zip(modalities, parent_schemes)])
        configuration["data_identifier"] = f"{plans_identifier}_{config_name}"
        props = plans["foreground_intensity_properties_per_channel"]
        for i, m in enumerate(modalities):
            if m == "PET":
                props[str(i)] = pet_window(props[str(i)], name)
    previous = plans["configurations"].get(config_name)
    plans["configurations"][config_name] = configuration
    configuration[PEMMA_KEY]["modality_normalization"] = modality_normalization(plans, config_name, modalities)
    if previous is not None and not overwrite and previous != json.loads(json.dumps(configuration)):
        changed = sorted(k for k in set(previous) | set(configuration)
                         if json.loads(json.dumps(configuration.get(k))) != previous.get(k))
        raise PlansError(f"{folder / plans_identifier}.json already has a configuration '{config_name}' that differs "
                         f"in {', '.join(changed)}; pass --overwrite to replace it (trained models keep their own "
                         f"plans.json)")
    _save_json(plans, folder / f"{plans_identifier}.json")
    splits = _write_splits(name, folder)
    if needs_preprocessing:
        _preprocess(name, plans_identifier, config_name, num_processes)
    return (f"{name}: added configuration '{config_name}' (preset {preset.name}, channels {modalities}) to "
            f"{plans_identifier}.json; {splits}"
            + ("; preprocessed with PET on a global SUV window" if needs_preprocessing else
               f"; reuses the preprocessed data of {parent}"))


def transfer_plans(source: str | int, target: str | int, preset_name: str, plans_identifier: str = "nnUNetPlans",
                   preprocess: bool = True, num_processes: int = 1, overwrite: bool = False) -> str:
    """Give TARGET the SOURCE configuration so an adapted model sees CT exactly as its base model did.

    nnU-Net's `move_plans_between_datasets` copies the plans (spacing, patch size, CT statistics) and sets the
    target's reader; then the statistics of channels SOURCE lacks (PET) come from TARGET's own fingerprint and
    every channel gets its modality's normalisation. Then TARGET is preprocessed with those plans.
    """
    from nnunetv2.experiment_planning.plans_for_pretraining.move_plans_between_datasets import \
        move_plans_between_datasets

    preset = load_preset(preset_name)
    config_name = preset.configuration
    source_name, source_folder = _preprocessed_dir(source)
    target_name, target_folder = _preprocessed_dir(target)
    source_plans = _load_plans(source_folder, plans_identifier)
    if config_name not in source_plans["configurations"]:
        raise PlansError(f"{source_name} has no '{config_name}' configuration: run "
                         f"`pemma plans add {source_name} --preset {preset.name}` (and train the base) first")
    target_plans_file = target_folder / f"{plans_identifier}.json"
    earlier = json.loads(target_plans_file.read_text()).get("pemma_transferred_from", False) \
        if target_plans_file.is_file() else None
    if earlier is False:
        raise PlansError(f"{target_plans_file} exists and was not written by `pemma plans transfer`; pass "
                         f"--plans OTHER_NAME (and -p OTHER_NAME to nnUNetv2_train) to keep it")
    if earlier not in (None, source_name) and not overwrite:
        raise PlansError(f"{target_plans_file} was transferred from {earlier}, not {source_name}; pass --overwrite "
                         f"to replace it (models trained on it keep their own plans.json)")
    raw_json = _raw_dir(target_name) / "dataset.json"
    if not raw_json.is_file():
        raise PlansError(f"{raw_json} not found: convert the target dataset first")
    target_modalities = channel_modalities(json.loads(raw_json.read_text()))
    source_modalities = channel_modalities(json.loads((source_folder / "dataset.json").read_text()))

    fingerprint = _extract_fingerprint(target_name, target_folder, num_processes)
    shutil.copy(raw_json, target_folder / "dataset.json")
    move_plans_between_datasets(source_name, target_name, plans_identifier)
    plans = json.loads(target_plans_file.read_text())
    plans["pemma_transferred_from"] = source_name

    source_props = source_plans["foreground_intensity_properties_per_channel"]
    target_props = fingerprint["foreground_intensity_properties_per_channel"]
    props: dict[str, Any] = {}
    for i, m in enumerate(target_modalities):
        if m in source_modalities:
            props[str(i)] = source_props[str(source_modalities.index(m))]
        else:
            props[str(i)] = pet_window(target_props[str(i)], target_name) if m == "PET" else target_props[str(i)]
    plans["foreground_intensity_properties_per_channel"] = props
    for configuration in plans["configurations"].values():
        if "normalization_schemes" in configuration:
            source_schemes = configuration["normalization_schemes"]
            _set_channel_normalisation(configuration, [
                source_schemes[source_modalities.index(m)] if m in source_modalities else PET_NORMALIZATION
                for m in target_modalities])
    for name, configuration in plans["configurations"].items():
        if PEMMA_KEY in configuration:
            configuration[PEMMA_KEY]["input_modalities"] = target_modalities
            configuration[PEMMA_KEY]["modality_normalization"] = modality_normalization(plans, name,
                                                                                        target_modalities)
    _save_json(plans, target_plans_file)
    splits = _write_splits(target_name, target_folder)
    if preprocess:
        _preprocess(target_name, plans_identifier, config_name, num_processes)
    return (f"{target_name}: '{config_name}' transferred from {source_name} (spacing, patch, CT statistics), "
            f"channels {target_modalities}; {splits}" + ("; preprocessed" if preprocess else ""))
