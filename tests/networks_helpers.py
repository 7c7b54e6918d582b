"""Tiny PEMMA networks of both backbones for the network tests (presets tiny and swin_tiny, CPU), and the sizes of
a full-size preset's adaptation."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from nnunetv2_pemma.adaptation.methods import added_by, train_only
from nnunetv2_pemma.config import MODALITIES, PemmaBlock, Preset
from nnunetv2_pemma.networks.build import build_pemma_network, build_plain_network
from nnunetv2_pemma.networks.modality_slots import ModalitySlots, count_parameters
from nnunetv2_pemma.plans import load_preset

CLASSES = 3
TINY_PRESETS = {"UNETR": "tiny", "SwinUNETR": "swin_tiny"}
"""The tiny preset of each backbone: UNETR on 32^3, SwinUNETR on 32x32x64 (the smallest patch it trains on)."""
ATTENTION_LAYERS = {"UNETR": 12, "SwinUNETR": 4}
"""Attention layers (each with a fused qkv) of the tiny networks: UNETR's 12 ViT blocks; swin_tiny's depths 1,1,1,1."""


@dataclasses.dataclass(frozen=True)
class Tiny:
    """A preset and the small networks the tests build from it."""

    preset: Preset

    @classmethod
    def of(cls, backbone_or_preset: str) -> "Tiny":
        """By backbone ("UNETR", "SwinUNETR": its tiny preset) or by preset name."""
        return cls(load_preset(TINY_PRESETS.get(backbone_or_preset, backbone_or_preset)))

    @property
    def backbone(self) -> str:
        return self.preset.model.architecture

    @property
    def img(self) -> tuple[int, ...]:
        return self.preset.patch_size

    def with_model(self, **changes: Any) -> "Tiny":
        """The same preset with other model hyper-parameters (not checked: e.g. a foreign base)."""
        return Tiny(dataclasses.replace(self.preset, model=dataclasses.replace(self.preset.model, **changes)))

    def block(self, modalities: Sequence[str] = MODALITIES, **adaptation: Any) -> PemmaBlock:
        """The plans' "pemma" block for `modalities`, with the adaptation settings changed by `adaptation`."""
        changed = dataclasses.replace(self.preset.adaptation, **adaptation)
        return dataclasses.replace(self.preset.block(tuple(modalities)), adaptation=changed)

    def base(self, in_channels: int = 1, img_size: Sequence[int] | None = None) -> nn.Module:
        """The plain MONAI network (a CT base with one input channel), in eval mode."""
        return build_plain_network(self.block(), in_channels, CLASSES, img_size or self.img).eval()

    def pemma(self, modalities: Sequence[str] = MODALITIES, **adaptation: Any) -> ModalitySlots:
        """The PEMMA network (fresh, not loaded from a base), in eval mode."""
        return build_pemma_network(self.block(modalities, **adaptation), CLASSES, self.img).eval()

    def adapted(self, base: nn.Module, modalities: Sequence[str] = MODALITIES, **adaptation: Any) -> ModalitySlots:
        """The PEMMA network loaded from `base`'s state dict."""
        net = self.pemma(modalities, **adaptation)
        net.load_base_state_dict(base.state_dict())
        return net

    def image(self, channels: int, batch: int = 2) -> torch.Tensor:
        return torch.randn(batch, channels, *self.img)


def perturb(net: nn.Module, *markers: str, std: float = 0.05) -> None:
    """Give every parameter whose name contains a marker a random value, as after some training."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if any(m in name for m in markers):
                p.normal_(std=std)


@dataclasses.dataclass
class AdaptationSizes:
    """Parameter counts of a preset's PEMMA network frozen for adaptation."""

    preset: Preset
    total: int
    trainable: int
    parts: Counter[str]  # trainable parameters by top-level PET module ("pet_*") or method prefix ("lora_")
    base_total: int | None = None  # the plain CT base's parameters

    @property
    def ratio(self) -> float:
        assert self.base_total is not None
        return self.trainable / self.base_total


def adaptation_sizes(preset_name: str, with_base: bool = True) -> AdaptationSizes:
    """Build the preset's PEMMA network (and its CT base), freeze it for adaptation and count; checks that the
    network is the base plus what trains, and that the parts add up to what trains."""
    preset = load_preset(preset_name)
    net = build_pemma_network(preset.block(MODALITIES), CLASSES, preset.patch_size)
    trainable_names = set(train_only(net, "adaptation"))
    total, trainable = count_parameters(net)
    parts: Counter[str] = Counter()
    for name, p in net.named_parameters():
        if name in trainable_names:
            parts[name.split(".")[0] if name.startswith("pet_") else str(added_by(name))] += p.numel()
    assert sum(parts.values()) == trainable
    sizes = AdaptationSizes(preset, total, trainable, parts)
    if with_base:
        sizes.base_total, _ = count_parameters(build_plain_network(preset.block(("CT",)), 1, CLASSES,
                                                                   preset.patch_size))
        assert total == sizes.base_total + trainable
        print(f"\n{preset.name} ({preset.model.architecture} {preset.patch_size}): base {sizes.base_total:,}, "
              f"PEMMA {total:,}, trainable {trainable:,} ({sizes.ratio:.2%} of base): "
              + ", ".join(f"{k} {v:,}" for k, v in sorted(parts.items())))
    return sizes
