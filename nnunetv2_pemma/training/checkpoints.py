"""Checks that a `-pretrained_weights` file fits the network a trainer is about to build.

nnU-Net loads `-pretrained_weights` right after `trainer.initialize()` and only asserts on the first tensor key
whose shape differs. PEMMA trainers check the file first and name every hyper-parameter that differs
(patch size, hidden size, heads, input channels, adapters).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from nnunetv2_pemma.adaptation.methods import is_added
from nnunetv2_pemma.config import PEMMA_KEY, PemmaBlock
from nnunetv2_pemma.errors import CheckpointError
from nnunetv2_pemma.networks.backbones import parse_model


PRETRAINED_FLAG = "-pretrained_weights"


def pretrained_weights_argument(argv: Sequence[str] | None = None) -> str | None:
    """The file given to `nnUNetv2_train ... -pretrained_weights FILE`, or None.

    nnU-Net lacks a hook here: `run_training` passes the file to `load_pretrained_weights` after
    `trainer.initialize()` but never to the trainer, which must know it earlier (to build the CT base it converts,
    and to name what differs before nnU-Net's first assertion). nnUNetv2_train's command line (kept by DDP's
    spawned workers) is the one place the trainer can read it. Runs started through nnU-Net's Python API without
    that argument (or with the flag abbreviated) get nnU-Net's own check only.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(args):  # the exact flag only: "-p PLANS" is nnU-Net's plans option, not an abbreviation
        if arg == PRETRAINED_FLAG and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(PRETRAINED_FLAG + "="):
            return arg.split("=", 1)[1]
    return None


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for truncated/foreign files
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise CheckpointError(f"{path}: not an nnU-Net checkpoint (no 'network_weights')")
    return checkpoint


def checkpoint_pemma_block(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    init_args = checkpoint.get("init_args") or {}
    plans, configuration = init_args.get("plans"), init_args.get("configuration")
    if not plans or configuration not in plans.get("configurations", {}):
        return None
    return plans["configurations"][configuration].get(PEMMA_KEY)


def _checkpoint_patch_size(checkpoint: dict[str, Any]) -> list[int] | None:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    init_args = checkpoint["init_args"]
    return list(PlansManager(init_args["plans"]).get_configuration(init_args["configuration"]).patch_size)


PATCH_EMBEDDING_KEYS = ("vit.patch_embedding.patch_embeddings.weight", "swinViT.patch_embed.proj.weight")


def input_channels(checkpoint: dict[str, Any]) -> int | None:
    """Input channels of the network in an nnU-Net checkpoint (None without a UNETR/SwinUNETR patch embedding)."""
    for key in PATCH_EMBEDDING_KEYS:
        if key in checkpoint["network_weights"]:
            return int(checkpoint["network_weights"][key].shape[1])
    return None


def _model_differences(theirs: dict[str, Any], ours: PemmaBlock) -> list[str]:
    try:
        their_model = parse_model(theirs["model"])
    except (KeyError, ValueError, TypeError) as e:
        return [f"its model section is not valid ({e})"]
    if type(their_model) is not type(ours.model):
        return [f"architecture {their_model.architecture} (checkpoint) vs {ours.model.architecture} (this network)"]
    mine, other = ours.model.to_json(), their_model.to_json()
    return [f"{k} {other.get(k)} (checkpoint) vs {mine.get(k)} (this network)"
            for k in sorted(set(mine) | set(other)) if other.get(k) != mine.get(k)]


def check_compatible(path: str | Path, block: PemmaBlock, patch_size: Sequence[int], *, expect: str
                     ) -> dict[str, Any]:
    """The checkpoint's "pemma" block; CheckpointError naming everything that differs from the network to build.

    expect: "ct_base" (a CT-only UNETR: the start of a PEMMA or early-fusion adaptation), "pemma" (a PEMMA model,
    for a continual update) or "early_fusion" (a two-channel early-fusion model, for a one-modality update).
    """
    checkpoint = load_checkpoint_file(path)
    trainer = checkpoint.get("trainer_name", "an unknown trainer")
    theirs = checkpoint_pemma_block(checkpoint)
    if theirs is None:
        raise CheckpointError(f"{path}: written by {trainer} with a configuration that is not a PEMMA UNETR "
                              f"(no 'pemma' block in its plans); expected a UNETR trained with a PEMMA preset")
    differences = _model_differences(theirs, block)
    their_patch = _checkpoint_patch_size(checkpoint)
    if their_patch != list(patch_size):
        differences.append(f"patch size {their_patch} (checkpoint) vs {list(patch_size)} (this network)")
    has_adapters = any(is_added(k) for k in checkpoint["network_weights"])
    channels = input_channels(checkpoint)
    if expect == "pemma":
        if not has_adapters:
            differences.append(f"no PEMMA adapters (LoRA, PET embedding): {trainer} wrote a plain UNETR; "
                               f"train it with PEMMATrainer first")
        elif theirs["adaptation"].get("method", "lora") != block.adaptation.method:
            differences.append(f"adapter method {theirs['adaptation'].get('method', 'lora')} (checkpoint) vs "
                               f"{block.adaptation.method} (this network)")
    elif has_adapters:
        differences.append(f"it already holds PEMMA adapters ({trainer}); a continual update uses "
                           f"PEMMAContinualTrainer")
    elif expect == "ct_base" and (channels != 1 or theirs.get("input_modalities") != ["CT"]):
        differences.append(f"input channels {theirs.get('input_modalities')} (checkpoint) vs ['CT'] "
                           f"(the base must be a CT-only UNETR)")
    elif expect == "early_fusion" and channels != 2:
        differences.append(f"{channels} input channel(s) (checkpoint) vs 2 (an early-fusion model)")
    if differences:
        raise CheckpointError(f"{path} does not fit this network: " + "; ".join(differences))
    return theirs


def inherit_modality_normalization(own: PemmaBlock, theirs: dict[str, Any]) -> dict[str, Any]:
    """Normalisation per modality: this dataset's own, plus the checkpoint's for modalities it lacks (PET after
    a CT-only update), so the updated model still takes every modality it was adapted to."""
    return {**theirs.get("modality_normalization", {}), **own.modality_normalization}


def _short(class_name: str) -> str:
    return class_name.rsplit(".", 1)[-1]


def _first_conv_weight(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The first convolution kernel of a state dict (nnU-Net's U-Nets list the input stage first)."""
    return next(v for v in weights.values() if v.ndim >= 4)


def _ct_normalisation(configuration: Any, plans: dict[str, Any]) -> tuple[Any, Any] | None:
    """(scheme, intensity properties) of the CT channel of a configuration (None without one); a configuration
    without a "pemma" block is a CT model."""
    modalities = (configuration.configuration.get(PEMMA_KEY) or {}).get("input_modalities", ["CT"])
    if "CT" not in modalities:
        return None
    i = modalities.index("CT")
    return configuration.normalization_schemes[i], plans["foreground_intensity_properties_per_channel"].get(str(i))


def input_channels_of_unet(checkpoint: dict[str, Any]) -> int:
    """Input channels of the nnU-Net U-Net in a checkpoint."""
    return int(_first_conv_weight(checkpoint["network_weights"]).shape[1])


def _unet_differences(their: Any, ours: Any, their_plans: dict[str, Any], our_plans: dict[str, Any]) -> list[str]:
    """What differs between two nnU-Net configurations in what a CT network was trained with: network, spacing,
    CT normalisation."""
    if their.network_arch_class_name != ours.network_arch_class_name:
        return [f"network {_short(their.network_arch_class_name)} (checkpoint) vs "
                f"{_short(ours.network_arch_class_name)} (this configuration): another plans' U-Net"]
    mine, other = ours.network_arch_init_kwargs, their.network_arch_init_kwargs
    out = [f"{k} {other.get(k)} (checkpoint) vs {mine.get(k)} (this configuration)"
           for k in sorted(set(mine) | set(other)) if other.get(k) != mine.get(k)]
    if list(their.spacing) != list(ours.spacing):
        out.append(f"spacing {list(their.spacing)} (checkpoint) vs {list(ours.spacing)} (this configuration)")
    their_ct, our_ct = (_ct_normalisation(c, p) for c, p in ((their, their_plans), (ours, our_plans)))
    if their_ct is not None and our_ct is not None and their_ct != our_ct:
        out.append("CT normalisation differs (another dataset's plans): give this dataset the base's plans with "
                   "`pemma plans transfer BASE_DATASET THIS_DATASET`")
    return out


def check_unet_checkpoint(path: str | Path, plans: dict[str, Any], configuration_manager: Any, *, expect: str
                          ) -> dict[str, Any]:
    """The "pemma" block of a checkpoint of nnU-Net's U-Net ({} for a plain nnU-Net training); CheckpointError
    naming everything that keeps it from being what the CNN trainer about to run starts from.

    expect: "ct_base" (any nnU-Net CT model: one input channel, named CT, no adapters), "pemma" (a PEMMA CNN
    model, for a continual update) or "early_fusion" (a two-channel model, for a one-modality update). The base's
    configuration must hold the same network, spacing and CT normalisation as this one; patch and batch may differ.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_pemma.networks.pemma_cnn import SUPPORTED_UNETS

    checkpoint = load_checkpoint_file(path)
    trainer = checkpoint.get("trainer_name", "an unknown trainer")
    init_args = checkpoint.get("init_args") or {}
    try:
        their = PlansManager(init_args["plans"]).get_configuration(init_args["configuration"])
        their_class = their.network_arch_class_name
    except (KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{path}: no nnU-Net plans in its init_args (written by {trainer}); expected an "
                              f"nnU-Net checkpoint_final.pth") from None
    theirs = their.configuration.get(PEMMA_KEY) or {}
    their_architecture = theirs.get("model", {}).get("architecture", "nnUNet") if theirs else "nnUNet"
    if their_architecture != "nnUNet" or _short(their_class) not in SUPPORTED_UNETS:
        network = their_architecture if their_architecture != "nnUNet" else _short(their_class)
        raise CheckpointError(f"{path}: written by {trainer}, a {network}, not one of nnU-Net's U-Nets "
                              f"({', '.join(SUPPORTED_UNETS)}); the CNN trainers start from nnU-Net's own models")
    differences = _unet_differences(their, configuration_manager, init_args["plans"], plans)
    weights = checkpoint["network_weights"]
    has_adapters = any(is_added(k) for k in weights)
    channels = input_channels_of_unet(checkpoint)
    if expect == "pemma":
        if not has_adapters:
            differences.append(f"no PEMMA adapters: {trainer} wrote a plain U-Net; adapt it with PEMMACNNTrainer "
                               f"first")
    elif has_adapters:
        differences.append(f"it already holds PEMMA adapters ({trainer}); a continual update uses "
                           f"PEMMACNNContinualTrainer")
    elif expect == "ct_base":
        names = list((init_args.get("dataset_json") or {}).get("channel_names", {}).values())
        if channels != 1:
            differences.append(f"{channels} input channels {names} (checkpoint) vs 1 (the base must be a CT-only "
                               f"model)")
        elif names and str(names[0]).upper() != "CT":
            differences.append(f"its input channel is {names[0]!r}, not CT (the base must be a CT-only model)")
    elif expect == "early_fusion" and channels != 2:
        differences.append(f"{channels} input channel(s) (checkpoint) vs 2 (an early-fusion model)")
    if differences:
        raise CheckpointError(f"{path} does not fit this network: " + "; ".join(differences))
    return theirs
