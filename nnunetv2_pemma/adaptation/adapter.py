"""Adapter files: the weights a PEMMA stage added to the CT base, as safetensors (no pickle).

Because the base parameter names never change inside a PEMMA network, an adapter is simply every tensor whose
name is not the base's ("lora" matrices and the "pet_" modules). Several centres' adapters can share one CT
checkpoint; `merge_adapter` rebuilds a full nnU-Net model folder from the two.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nnunetv2_pemma.errors import CheckpointError

ADAPTER_FILE = "adapter_final.safetensors"


def is_adapter_key(key: str) -> bool:
    return "lora" in key or key.startswith("pet_")


def save_adapter(state_dict: Mapping[str, torch.Tensor], path: Path, *, trainer_name: str, configuration: str,
                 plans: dict[str, Any], dataset_json: dict[str, Any], mirroring_axes: Any) -> Path:
    """Write the adapter tensors of `state_dict` with what nnU-Net needs to rebuild the network as metadata."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if is_adapter_key(k)}
    if not tensors:
        raise CheckpointError(f"no adapter tensors ('lora', 'pet_') in the network to write to {path}")
    axes = None if mirroring_axes is None else [int(a) for a in mirroring_axes]
    metadata = {"trainer_name": trainer_name, "configuration": configuration, "plans": json.dumps(plans),
                "dataset_json": json.dumps(dataset_json), "inference_allowed_mirroring_axes": json.dumps(axes)}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def read_adapter(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for foreign or truncated files
        raise CheckpointError(f"{path}: not a readable safetensors adapter ({type(e).__name__}: {e})") from None


def merge_adapter(base_checkpoint: Path, adapter: Path, out_folder: Path, fold: int | str = 0) -> Path:
    """Write `out_folder/{plans.json, dataset.json, fold_F/checkpoint_final.pth}` = CT base + adapter.

    The merged weights are loaded strictly into the network the adapter's plans describe, so a base or adapter
    that does not fit fails here with the keys that differ, not later in nnUNetv2_predict.
    """
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_pemma.training.checkpoints import load_checkpoint_file

    base = load_checkpoint_file(base_checkpoint)
    tensors, meta = read_adapter(adapter)
    missing_meta = {"trainer_name", "configuration", "plans", "dataset_json"} - meta.keys()
    if missing_meta:
        raise CheckpointError(f"{adapter}: adapter metadata lacks {sorted(missing_meta)}")
    foreign = [k for k in base["network_weights"] if is_adapter_key(k)]
    if foreign:
        raise CheckpointError(f"{base_checkpoint}: expected a CT base checkpoint, found adapter tensors "
                              f"({foreign[0]}, ...)")
    plans, dataset_json = json.loads(meta["plans"]), json.loads(meta["dataset_json"])
    weights = {**base["network_weights"], **tensors}
    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(meta["configuration"])
    network = recursive_find_trainer_class_by_name(meta["trainer_name"]).build_network_architecture(
        plans_manager, configuration_manager,
        determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
    try:
        network.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{base_checkpoint} + {adapter} do not make the adapted network: {e}") from None
    checkpoint = {"network_weights": weights, "trainer_name": meta["trainer_name"],
                  "init_args": {"plans": plans, "configuration": meta["configuration"], "fold": fold,
                                "dataset_json": dataset_json},
                  "inference_allowed_mirroring_axes": json.loads(meta.get("inference_allowed_mirroring_axes",
                                                                          "null")),
                  "current_epoch": base.get("current_epoch"), "optimizer_state": None, "grad_scaler_state": None,
                  "logging": None, "_best_ema": None}
    fold_dir = out_folder / f"fold_{fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    (out_folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (out_folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    torch.save(checkpoint, fold_dir / "checkpoint_final.pth")
    return fold_dir / "checkpoint_final.pth"
