"""Adapter files: the tensors a PEMMA stage added to the CT base, as safetensors (no pickle).

Because the base parameter names never change inside a PEMMA network, an adapter is every tensor that an
adaptation method declares as its own (`methods.is_added`). Several centres' adapters can share one CT
checkpoint; `apply_adapter` rebuilds a full nnU-Net model folder from the two.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nnunetv2_pemma.adaptation.methods import is_added
from nnunetv2_pemma.errors import CheckpointError

ADAPTER_FILE = "adapter_final.safetensors"


def save_adapter(state_dict: Mapping[str, torch.Tensor], path: Path, *, trainer_name: str, configuration: str,
                 plans: dict[str, Any], dataset_json: dict[str, Any], mirroring_axes: Any) -> Path:
    """Write the adapter tensors of `state_dict` with what nnU-Net needs to rebuild the network as metadata."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if is_added(k)}
    if not tensors:
        raise CheckpointError(f"no adapter tensors in the network to write to {path}")
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


def apply_adapter(base_checkpoint: Path, adapter: Path, out_folder: Path, fold: int | str = 0) -> Path:
    """Write `out_folder/{plans.json, dataset.json, fold_F/checkpoint_final.pth}` = CT base + adapter.

    The folder is first written to a temporary place, where nnU-Net's predictor builds the network from it and
    loads the weights strictly: a base or adapter that does not fit fails here with the keys that differ, not
    later in nnUNetv2_predict, and leaves nothing behind.
    """
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunetv2_pemma.training.checkpoints import load_checkpoint_file

    base = load_checkpoint_file(base_checkpoint)
    tensors, meta = read_adapter(adapter)
    missing_meta = {"trainer_name", "configuration", "plans", "dataset_json"} - meta.keys()
    if missing_meta:
        raise CheckpointError(f"{adapter}: adapter metadata lacks {sorted(missing_meta)}")
    foreign = [k for k in base["network_weights"] if is_added(k)]
    if foreign:
        raise CheckpointError(f"{base_checkpoint}: expected a CT base checkpoint, found adapter tensors "
                              f"({foreign[0]}, ...)")
    plans, dataset_json = json.loads(meta["plans"]), json.loads(meta["dataset_json"])
    weights = {**base["network_weights"], **tensors}
    checkpoint = {"network_weights": weights, "trainer_name": meta["trainer_name"],
                  "init_args": {"plans": plans, "configuration": meta["configuration"], "fold": fold,
                                "dataset_json": dataset_json},
                  "inference_allowed_mirroring_axes": json.loads(meta.get("inference_allowed_mirroring_axes",
                                                                          "null")),
                  "current_epoch": base.get("current_epoch"), "optimizer_state": None, "grad_scaler_state": None,
                  "logging": None, "_best_ema": None}
    out_folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_folder.parent, prefix=f".{out_folder.name}.") as tmp:
        staged = Path(tmp) / "model"
        (staged / f"fold_{fold}").mkdir(parents=True)
        (staged / "plans.json").write_text(json.dumps(plans, indent=2))
        (staged / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
        torch.save(checkpoint, staged / f"fold_{fold}" / "checkpoint_final.pth")
        predictor = nnUNetPredictor(device=torch.device("cpu"), verbose=False, allow_tqdm=False)
        try:  # nnU-Net builds the network from the staged folder and loads the weights strictly
            predictor.initialize_from_trained_model_folder(str(staged), (fold,))
        except RuntimeError as e:
            reason = " ".join(str(e).split())  # torch's message spans lines
            raise CheckpointError(f"{base_checkpoint} + {adapter} do not make the adapted network: {reason}") from None
        for item in staged.iterdir():
            target = out_folder / item.name
            if target.is_dir():
                shutil.rmtree(target)
            out_folder.mkdir(exist_ok=True)
            shutil.move(str(item), str(target))
    return out_folder / f"fold_{fold}" / "checkpoint_final.pth"
