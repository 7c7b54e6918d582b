"""Every trainable parameter gets a gradient: DistributedDataParallel (nnU-Net's -num_gpus) fails otherwise."""

from __future__ import annotations

import pytest
import torch

from networks_helpers import CLASSES, Tiny
from nnunetv2_pemma.adaptation.methods import train_only
from nnunetv2_pemma.networks.early_fusion import EarlyFusionUNETR


def _network(name: str) -> tuple[torch.nn.Module, Tiny, int]:
    backbone, kind = name.split(" ", 1)
    tiny = Tiny.of(backbone)
    if kind == "plain":
        return tiny.base(), tiny, 1
    if kind == "early fusion":
        return EarlyFusionUNETR(tiny.preset.model, CLASSES, tiny.img), tiny, 2
    pemma = tiny.pemma(("CT", "PET"))
    train_only(pemma, "adaptation")
    return pemma, tiny, 2


@pytest.mark.parametrize("name", ["UNETR plain", "UNETR early fusion", "UNETR PEMMA CP", "SwinUNETR plain",
                                  "SwinUNETR PEMMA CP"])
def test_every_trainable_parameter_gets_a_gradient(name: str) -> None:
    network, tiny, channels = _network(name)
    network(tiny.image(channels, batch=1)).sum().backward()
    without = [n for n, p in network.named_parameters() if p.requires_grad and p.grad is None]
    assert not without, without
