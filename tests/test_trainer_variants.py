"""Every trainer variant does what its name says, through nnU-Net's own trainer set-up and weight loading.

The variants only override preset values; this checks that the override reaches the network nnU-Net trains and
the plans it records, for PET initialisation (PEMMA and early fusion) and modality dropout.
"""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import CONFIG

from nnunetv2_pemma.training.checkpoints import pretrained_weights_argument


def test_pretrained_weights_come_from_nnunetv2_trains_command_line() -> None:
    argv = ["502", CONFIG, "0", "-tr", "PEMMATrainer", "-device", "cpu", "-pretrained_weights", "base.pth"]
    assert pretrained_weights_argument(argv) == "base.pth"
    assert pretrained_weights_argument(argv[:-2]) is None
    assert pretrained_weights_argument(argv[:-2] + ["-p", "nnUNetResEncUNetPlans"]) is None  # no abbreviations


def _pet_embedding(net: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(CT, PET) patch projection weights of a PEMMA UNETR."""
    return (net.vit.patch_embedding.patch_embeddings.weight, net.pet_patch_embedding.patch_embeddings.weight)


def _early_fusion_channels(net: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(CT, PET) input-channel slices of an early-fusion UNETR's patch projection."""
    w = net.vit.patch_embedding.patch_embeddings.weight
    return w[:, 0], w[:, 1]


CHECKS = {
    "PEMMATrainer": ("pet_init", "cross", lambda n: torch.equal(*_pet_embedding(n))),
    "PEMMATrainer_zeroinit": ("pet_init", "zero", lambda n: not _pet_embedding(n)[1].any()
                              and not n.pet_encoder1.layer.conv1.conv.weight.any()),
    "PEMMATrainer_randominit": ("pet_init", "random", lambda n: _pet_embedding(n)[1].any()
                                and not torch.equal(*_pet_embedding(n))),
    "EarlyFusionTrainer_crossinit": ("pet_init", "cross", lambda n: torch.equal(*_early_fusion_channels(n))),
    "EarlyFusionTrainer_zeroinit": ("pet_init", "zero", lambda n: not _early_fusion_channels(n)[1].any()),
    "EarlyFusionTrainer_randominit": ("pet_init", "random", lambda n: _early_fusion_channels(n)[1].any()
                                      and not torch.equal(*_early_fusion_channels(n))),
    "PEMMATrainer_noModalityDropout": ("modality_dropout", None, lambda n: n.adaptation.modality_dropout is None),
    "PEMMATrainer_modalityDropout": ("modality_dropout", [0.5, 0.25, 0.25],
                                     lambda n: n.adaptation.modality_dropout == (0.5, 0.25, 0.25)),
}


@pytest.mark.slow
@pytest.mark.parametrize("trainer_name", sorted(CHECKS))
def test_variant_reaches_the_network_and_the_plans(own_workflow: dict, trainer_name: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """(On a copy of the workflow: nnU-Net's trainer makes its output folder.)"""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.run.run_training import get_trainer_from_args

    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        monkeypatch.setenv(name, own_workflow["env"][name])
    base = str(own_workflow["base"])
    monkeypatch.setattr(sys, "argv", ["nnUNetv2_train", "502", CONFIG, "0", "-tr", trainer_name,
                                      "-pretrained_weights", base])
    trainer = get_trainer_from_args("502", CONFIG, 0, trainer_name, device=torch.device("cpu"))
    trainer.initialize()
    load_pretrained_weights(trainer.network, base)  # as nnUNetv2_train does after initialize()
    trainer._adapt()
    key, value, holds = CHECKS[trainer_name]
    assert trainer.plans_manager.plans["configurations"][CONFIG]["pemma"]["adaptation"][key] == value
    assert holds(trainer.network), f"{trainer_name}: the network does not show {key}={value}"
