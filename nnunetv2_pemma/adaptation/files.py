"""Adapter files: the tensors a PEMMA stage added to the CT base, as safetensors (no pickle).

Because the base parameter names never change inside a PEMMA network, an adapter is every tensor that an
adaptation method declares as its own (`methods.is_added`). Several centres' adapters can share one CT
checkpoint; `apply_adapter` rebuilds a full nnU-Net model folder from the two, and refuses a CT checkpoint other
than the one the adapter was trained on (`provenance`): any other loads without complaint and gives another model.

A mixture of adapters also writes one file per expert it trained (`experts/<key>.safetensors`, the same format:
the expert's tensors, the run's metadata and its CT base's fingerprint). One CT base, the adaptation stage's
adapter and N centres' expert files make a model: `apply_adapter(..., experts=[...])`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nnunetv2_pemma.adaptation.methods import is_added
from nnunetv2_pemma.adaptation.provenance import BASE_FILE_KEY, FINGERPRINT_KEY, PEMMA_BASE_KEY, base_fingerprint
from nnunetv2_pemma.config import PEMMA_KEY
from nnunetv2_pemma.errors import CheckpointError, PemmaError, warn
from nnunetv2_pemma.filesystem import replace_folder, sigterm_as_interrupt

ADAPTER_FILE = "adapter_final.safetensors"
EXPERTS_FOLDER = "experts"
EXPERT_KEY = "moa_expert"  # metadata: which expert an expert file holds
_SHOWN = 12  # hex digits of a fingerprint shown in messages


def save_adapter(state_dict: Mapping[str, torch.Tensor], path: Path, *, trainer_name: str, configuration: str,
                 plans: dict[str, Any], dataset_json: dict[str, Any], mirroring_axes: Any,
                 base_file: str | None = None, extra_metadata: Mapping[str, str] | None = None) -> Path:
    """Write the adapter tensors of `state_dict` with what nnU-Net needs to rebuild the network as metadata, and
    the fingerprint of its (frozen) base tensors plus `base_file`, so that `apply_adapter` can check the base."""
    # a copy per name: nnU-Net's U-Nets register a layer under several names (its decoder holds the encoder, its
    # conv blocks hold each layer twice), and a checkpoint made from the file needs every name
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in state_dict.items() if is_added(k)}
    if not tensors:
        raise CheckpointError(f"no adapter tensors in the network to write to {path}")
    axes = None if mirroring_axes is None else [int(a) for a in mirroring_axes]
    metadata = {"trainer_name": trainer_name, "configuration": configuration, "plans": json.dumps(plans),
                "dataset_json": json.dumps(dataset_json), "inference_allowed_mirroring_axes": json.dumps(axes),
                FINGERPRINT_KEY: base_fingerprint(state_dict)}
    if base_file is not None:
        metadata[BASE_FILE_KEY] = str(base_file)
    metadata.update(extra_metadata or {})
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def save_expert(state_dict: Mapping[str, torch.Tensor], key: str, folder: Path, **metadata: Any) -> Path:
    """Write expert `key` of a mixture network's `state_dict` to `folder/<key>.safetensors` (`save_adapter`'s
    format and metadata, plus the expert's key)."""
    from nnunetv2_pemma.adaptation.mixture import expert_parameter_key

    folder.mkdir(parents=True, exist_ok=True)
    own = {k: v for k, v in state_dict.items() if not is_added(k) or expert_parameter_key(k) == key}
    return save_adapter(own, folder / f"{key}.safetensors", **metadata, extra_metadata={EXPERT_KEY: key})


def read_adapter(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for foreign or truncated files
        reason = " ".join(str(e).split())
        raise CheckpointError(f"{path}: not a readable safetensors adapter ({type(e).__name__}: {reason})") from None


def _require_file(path: Path, what: str) -> None:
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is not a file")


def _check_output(out_folder: Path, inputs: tuple[Path, ...], overwrite: bool) -> None:
    """Fail before the work, not after it: an existing folder (`replace_folder` checks again at the end), or one
    that holds an input file, which replacing it as a whole would delete."""
    if out_folder.exists() and not overwrite:
        raise PemmaError(f"model folder {out_folder} already exists; pass --overwrite to replace it")
    for path in inputs:
        if out_folder.resolve() in path.resolve().parents:
            raise PemmaError(f"model folder {out_folder} holds {path}, which it would replace; write it elsewhere")


def _metadata_json(meta: Mapping[str, str], key: str, adapter: Path) -> Any:
    try:
        return json.loads(meta.get(key, "null"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{adapter}: adapter metadata {key!r} is not JSON ({e})") from None


def _read_inputs(base_checkpoint: Path, adapter: Path
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """The CT base checkpoint, and the adapter's tensors and metadata; CheckpointError if either is another kind."""
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
    return base, tensors, meta


def _check_base(meta: Mapping[str, str], fingerprint: str, base_checkpoint: Path, adapter: Path,
                force: bool) -> None:
    """Refuse a base other than the one the adapter was trained on, or any base for an adapter that records none
    (earlier releases); with `force`, warn instead."""
    recorded = meta.get(FINGERPRINT_KEY)
    if recorded == fingerprint:
        return
    ours = f"{base_checkpoint} (fingerprint {fingerprint[:_SHOWN]}…)"
    if recorded is None:
        reason = (f"adapter {adapter} records no CT base (written by an earlier release), so it cannot be checked "
                  f"against {ours}")
    else:
        trained_on = f"{meta[BASE_FILE_KEY]}, " if BASE_FILE_KEY in meta else ""
        reason = (f"adapter {adapter} was trained on another CT base (recorded: {trained_on}fingerprint "
                  f"{recorded[:_SHOWN]}…) than {ours}")
    if not force:
        raise CheckpointError(f"{reason}; pass --force to apply it anyway")
    warn(f"{reason}; applying it anyway (--force)")


def _adapted_checkpoint(base: dict[str, Any], tensors: dict[str, torch.Tensor], meta: Mapping[str, str],
                        adapter: Path, fold: int | str, pemma_base: dict[str, str]) -> dict[str, Any]:
    """An nnU-Net checkpoint of the adapted network, recording its CT base as PEMMA trainers do."""
    return {"network_weights": {**base["network_weights"], **tensors}, "trainer_name": meta["trainer_name"],
            "init_args": {"plans": _metadata_json(meta, "plans", adapter), "configuration": meta["configuration"],
                          "fold": fold, "dataset_json": _metadata_json(meta, "dataset_json", adapter),
                          PEMMA_BASE_KEY: pemma_base},
            "inference_allowed_mirroring_axes": _metadata_json(meta, "inference_allowed_mirroring_axes", adapter),
            "current_epoch": base.get("current_epoch"), "optimizer_state": None, "grad_scaler_state": None,
            "logging": None, "_best_ema": None}


def _write_model_folder(folder: Path, checkpoint: dict[str, Any], fold: int | str) -> None:
    (folder / f"fold_{fold}").mkdir(parents=True)
    for file, key in (("plans.json", "plans"), ("dataset.json", "dataset_json")):
        (folder / file).write_text(json.dumps(checkpoint["init_args"][key], indent=2))
    torch.save(checkpoint, folder / f"fold_{fold}" / "checkpoint_final.pth")


def _validate(folder: Path, fold: int | str, base_checkpoint: Path, adapter: Path) -> None:
    """nnU-Net's predictor builds the network from the folder and loads the weights strictly."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=torch.device("cpu"), verbose=False, allow_tqdm=False)
    try:
        predictor.initialize_from_trained_model_folder(str(folder), (fold,))
    except RuntimeError as e:
        reason = " ".join(str(e).split())  # torch's message spans lines
        raise CheckpointError(f"{base_checkpoint} + {adapter} do not make the adapted network: {reason}") from None


def _with_experts(tensors: dict[str, torch.Tensor], meta: dict[str, str], adapter: Path, experts: Sequence[Path],
                  fingerprint: str, base_checkpoint: Path, force: bool
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The adapter's tensors with each expert file's expert added (or replaced), and its plans listing them."""
    from nnunetv2_pemma.adaptation.mixture import expert_parameter_key

    plans = _metadata_json(meta, "plans", adapter)
    adaptation = plans["configurations"][meta["configuration"]][PEMMA_KEY]["adaptation"]
    if adaptation.get("method") != "moa" or adaptation.get("moa_routing") != "center":
        raise CheckpointError(f"{adapter}: expert files extend a centre-routed mixture of adapters; this adapter's "
                              f"method is {adaptation.get('method', 'lora')}")
    keys, seen = list(adaptation.get("moa_experts", [])), set()
    for path in experts:
        _require_file(path, "expert file")
        expert_tensors, expert_meta = read_adapter(path)
        key = expert_meta.get(EXPERT_KEY)
        if key is None:
            raise CheckpointError(f"{path}: not an expert file (its metadata names no {EXPERT_KEY})")
        if key in seen:
            raise CheckpointError(f"{path}: a second file for expert {key}")
        seen.add(key)
        _check_base(expert_meta, fingerprint, base_checkpoint, path, force)
        tensors = {**{k: v for k, v in tensors.items() if expert_parameter_key(k) != key}, **expert_tensors}
        keys += [] if key in keys else [key]
    adaptation["moa_experts"] = keys
    return tensors, {**meta, "plans": json.dumps(plans)}


def apply_adapter(base_checkpoint: Path, adapter: Path, out_folder: Path, fold: int | str = 0, *,
                  force: bool = False, overwrite: bool = False, experts: Sequence[Path] = ()) -> Path:
    """Write the model folder `out_folder/{plans.json, dataset.json, fold_F/checkpoint_final.pth}` = CT base +
    adapter (+ the `experts` files of a mixture of adapters), if the base is the one the adapter and experts were
    trained on (`force`: any base, with a warning).

    The folder is first written to a temporary place, where nnU-Net's predictor builds the network from it and
    loads the weights strictly: a base or adapter that does not fit fails there with the keys that differ, not
    later in nnUNetv2_predict. Only then does it replace `out_folder` (as a whole, and only with `overwrite`); an
    error, Ctrl-C or SIGTERM leaves nothing behind.
    """
    _require_file(base_checkpoint, "CT base checkpoint")
    _require_file(adapter, "adapter")
    _check_output(out_folder, (base_checkpoint, adapter, *experts), overwrite)
    base, tensors, meta = _read_inputs(base_checkpoint, adapter)
    fingerprint = base_fingerprint(base["network_weights"])
    _check_base(meta, fingerprint, base_checkpoint, adapter, force)
    if experts:
        tensors, meta = _with_experts(tensors, meta, adapter, experts, fingerprint, base_checkpoint, force)
    pemma_base = {FINGERPRINT_KEY: fingerprint, BASE_FILE_KEY: str(base_checkpoint.resolve())}
    checkpoint = _adapted_checkpoint(base, tensors, meta, adapter, fold, pemma_base)
    with sigterm_as_interrupt():  # nothing is written before this block
        try:
            out_folder.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out_folder.parent, prefix=f".{out_folder.name}.") as tmp:
                staged = Path(tmp) / "model"
                _write_model_folder(staged, checkpoint, fold)
                _validate(staged, fold, base_checkpoint, adapter)
                replace_folder(staged, out_folder, overwrite, "model folder")
        except OSError as e:
            raise PemmaError(f"model folder {out_folder} cannot be written ({type(e).__name__}: {e})") from None
    return out_folder / f"fold_{fold}" / "checkpoint_final.pth"
