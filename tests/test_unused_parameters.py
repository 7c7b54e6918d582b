"""Every trainable parameter gets a gradient: DistributedDataParallel (nnU-Net's -num_gpus) fails otherwise."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO
from nnunetv2_pemma.networks import PEMMAUNETR, build_unetr, freeze_for_adaptation
from nnunetv2_pemma.networks.early_fusion import EarlyFusionUNETR

PRESET = json.loads((REPO / "plans" / "tiny.json").read_text())
SIZE = (32, 32, 32)


def _networks() -> dict[str, tuple[torch.nn.Module, int]]:
    pemma = PEMMAUNETR(PRESET["model"], PRESET["adaptation"], 3, SIZE, ("CT", "PET"))
    freeze_for_adaptation(pemma)
    return {"UNETR": (build_unetr(PRESET["model"], 1, 3, SIZE), 1),
            "early fusion": (EarlyFusionUNETR(PRESET["model"], 3, SIZE), 2), "PEMMA CP": (pemma, 2)}


@pytest.mark.parametrize("name", ["UNETR", "early fusion", "PEMMA CP"])
def test_every_trainable_parameter_gets_a_gradient(name: str) -> None:
    network, channels = _networks()[name]
    network(torch.randn(1, channels, *SIZE)).sum().backward()
    without = [n for n, p in network.named_parameters() if p.requires_grad and p.grad is None]
    assert not without, without
