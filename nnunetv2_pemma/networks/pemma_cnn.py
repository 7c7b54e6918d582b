"""PEMMA on nnU-Net's own CNN U-Nets (``PlainConvUNet``, ``ResidualEncoderUNet``): modality slots, conv adapters.

nnU-Net builds the CT network from the plans; :func:`pemma_unet` turns that very network into its PEMMA form, as
:class:`~nnunetv2_pemma.networks.pemma_unetr.PEMMAUNETR` extends MONAI's UNETR:

- the input stage (the encoder's stem where it has one, else its first stage) is the CT slot. A PET slot of the
  same shape sits beside it and the outputs are summed, ``z = slot_CT(CT) + beta * slot_PET(PET)``. An absent
  modality's slot is left out (``missing_modality`` "drop"), so CT alone computes the base wherever the adapters are
  off;
- every other convolution of encoder, decoder and segmentation heads, and those of the CT slot, gets the preset's
  conv adapter (conv LoRA, B = 0); with ``adaptation.train_norms`` every instance norm also gets a zero shift of
  its scale and bias. Transposed convolutions (the decoder's upsampling) stay frozen: peft has no LoRA for them;
- with ``adaptation.ct_only_adapters`` every conv LoRA has a second pair for CT-only input (``ct_lora_*``): the
  adaptation trains the PET pair on CT+PET and PET samples, so CT alone stays the base, and a CT-only update
  trains the CT pair alone, so CT+PET and PET outputs stay bit-identical;
- nnU-Net's own forward, deep supervision and state-dict names are kept, so a CT checkpoint loads as it is and
  what PEMMA adds is what its adapter methods declare (``pet_slot.*`` and ``pet_beta``; ``conv_lora_*``;
  ``norm_shift_*``).

The network and its input stage get the PEMMA behaviour as a class placed in front of their own
(:func:`~nnunetv2_pemma.networks.class_extension.extend_class`): their modules, parameters and names stay nnU-Net's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn as nn

from nnunetv2_pemma.adaptation.conv_layers import RoutedLoRAConv2d, RoutedLoRAConv3d
from nnunetv2_pemma.adaptation.folding import FOLDED_FOR_PET
from nnunetv2_pemma.adaptation.methods import (CT_LORA, MODALITY_SLOTS, NORM_SHIFT, AdapterMethod,
                                               get_conv_method, is_added)
from nnunetv2_pemma.adaptation.norm_layers import wrap_norm
from nnunetv2_pemma.config import MODALITIES, Adaptation
from nnunetv2_pemma.errors import PlansError
from nnunetv2_pemma.networks.class_extension import extend_class
from nnunetv2_pemma.networks.mismatch import IncompatibleBaseError, base_mismatches
from nnunetv2_pemma.networks.modality_slots import check_modalities, fresh_copy, sample_modality_masks

SUPPORTED_UNETS = ("PlainConvUNet", "ResidualEncoderUNet")
"""nnU-Net's U-Nets (dynamic_network_architectures) PEMMA adapts: the default plans' and the ResEnc plans'."""

def input_stage_name(unet: nn.Module) -> str:
    """The module that reads the image: the encoder's stem where there is one (ResEnc), else its first stage's
    convolutions (the plain encoder wraps each stage's blocks in a one-element ``nn.Sequential``)."""
    if getattr(unet.encoder, "stem", None) is not None:
        return "encoder.stem"
    stage = unet.encoder.stages[0]
    return "encoder.stages.0.0" if type(stage) is nn.Sequential and len(stage) == 1 else "encoder.stages.0"


def _per_sample(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.ndim - 1))).to(like)


class ModalitySlotInput(nn.Module):
    """The input stage of a CT U-Net as the CT slot, with a PET slot (``pet_slot``, same shape) and its weight
    ``pet_beta``; the network sets which modalities the input channels hold and, in training, which each sample
    keeps (modality dropout)."""

    pet_slot: nn.Module
    pet_beta: torch.Tensor
    input_modalities: tuple[str, ...]
    missing_modality: str
    keep: torch.Tensor | None  # (B, 2) bool, CT and PET kept per sample, or None: all kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, len(input_modalities), *spatial) -> (B, F, *spatial'): the slots' outputs summed over the
        modalities present (with ``missing_modality`` "zero", an absent one is a zero image through its slot)."""
        images = {m: x[:, i: i + 1] for i, m in enumerate(self.input_modalities)}
        if self.missing_modality == "zero":
            images = {m: images.get(m, torch.zeros_like(x[:, :1])) for m in MODALITIES}
        out = None
        for modality, image in images.items():
            keep = None if self.keep is None else self.keep[:, MODALITIES.index(modality)]
            if keep is not None and self.missing_modality == "zero":
                image = image * _per_sample(keep, image)
            z = super().forward(image) if modality == "CT" else self.pet_beta * self.pet_slot(image)
            if keep is not None and self.missing_modality == "drop":
                z = z * _per_sample(keep, z)
            out = z if out is None else out + z
        return out


class PEMMA(nn.Module):
    """What an nnU-Net U-Net becomes under PEMMA (mixin in front of its class; built by :func:`pemma_unet`)."""

    adaptation: Adaptation
    adapter_methods: tuple[AdapterMethod, ...]
    input_modalities: tuple[str, ...]

    @property
    def input_slots(self) -> ModalitySlotInput:
        return self.get_submodule(input_stage_name(self))

    @property
    def backbone_name(self) -> str:
        return type(self).__mro__[2].__name__

    def set_input_modalities(self, modalities: Sequence[str]) -> None:
        """Declare which modalities the input channels hold, in order (C, P or CP inference)."""
        self.input_modalities = check_modalities(modalities)
        self.input_slots.input_modalities = self.input_modalities

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """x: (B, len(input_modalities), *spatial) -> nnU-Net's output (logits, or a list with deep supervision);
        in training with ``adaptation.modality_dropout``, each sample of a CT+PET batch keeps CT+PET, CT or PET."""
        if x.shape[1] != len(self.input_modalities):
            raise ValueError(f"input has {x.shape[1]} channels, expected {len(self.input_modalities)} "
                             f"({self.input_modalities})")
        folded_for_pet = getattr(self, FOLDED_FOR_PET, None)
        if folded_for_pet is not None and folded_for_pet != ("PET" in self.input_modalities):
            raise ValueError(f"this network was folded for {'input with PET' if folded_for_pet else 'CT alone'}, "
                             f"not {'+'.join(self.input_modalities)}: fold an unfolded copy for that input")
        probs = self.adaptation.training_patterns()
        keep = None
        if self.training and probs is not None and len(self.input_modalities) == len(MODALITIES):
            keep = torch.stack(sample_modality_masks(probs, x.shape[0]), dim=1).to(x.device)
        self.input_slots.keep = keep
        if self.adaptation.ct_only_adapters:
            holds_pet = torch.full((x.shape[0],), "PET" in self.input_modalities, device=x.device)
            if keep is not None:
                holds_pet = keep[:, MODALITIES.index("PET")]
            for layer in self.modules():
                if isinstance(layer, (RoutedLoRAConv2d, RoutedLoRAConv3d)):
                    layer.holds_pet = holds_pet
        return super().forward(x)

    def trained_in_update(self) -> tuple[str, ...]:
        """The adapter prefixes a continual update on this input trains: with ``ct_only_adapters``, the CT-only
        pair on CT-only data and the PET pair (``conv_lora_``) on data that hold PET, so an update never touches
        what the other input patterns compute; else every prefix the stage trains."""
        prefixes = tuple(p for m in self.adapter_methods for p in m.trains.get("continual", ()))
        if not self.adaptation.ct_only_adapters:
            return prefixes
        return ("conv_lora_",) if "PET" in self.input_modalities else (CT_LORA.prefixes[0],)

    def load_base_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a CT base state dict (the plain nnU-Net U-Net's), reset the adapters, initialise the PET slot.

        Raises:
            IncompatibleBaseError: (a ValueError) naming what differs: input channels, keys, tensor shapes.
        """
        expected = {k: v for k, v in self.state_dict().items() if not is_added(k)}
        problems = base_mismatches(state_dict, expected, self.explain_base_mismatch)
        if problems:
            raise IncompatibleBaseError(f"state dict is not a CT {self.backbone_name} base this PEMMA network can "
                                        f"adapt (base vs network): " + "; ".join(problems))
        self.load_state_dict(state_dict, strict=False)
        self.reset_adapters()
        self.init_pet_modules()

    def explain_base_mismatch(self, base: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
                              ) -> list[str]:
        """The input channels of the base's first convolution, when it does not read one (CT) image."""
        first = next(k for k in expected if k.startswith(input_stage_name(self)) and k.endswith(".weight"))
        if first in base and base[first].ndim == expected[first].ndim and base[first].shape[1] != 1:
            return [f"{base[first].shape[1]} input channels vs 1 (the base must be a CT-only model)"]
        return []

    def reset_adapters(self) -> None:
        """Every adapter back to its start (conv LoRA B = 0, norm shifts 0): the base's function."""
        for m in self.modules():
            if hasattr(m, "reset_lora_parameters"):
                m.reset_lora_parameters()

    @torch.no_grad()
    def init_pet_modules(self) -> None:
        """Initialise the PET slot per ``pet_init``: "cross" copies the CT slot; "zero" copies it and zeros its
        last norm's scale and bias, so the slot outputs exactly zero at the start while its gradients flow;
        "random" keeps the fresh init."""
        slots = self.input_slots
        if self.adaptation.pet_init in ("cross", "zero"):
            base = {k: v for k, v in slots.state_dict().items() if not is_added(k)}
            slots.pet_slot.load_state_dict(base)
        if self.adaptation.pet_init == "zero":
            norms = (nn.modules.instancenorm._InstanceNorm, nn.modules.batchnorm._BatchNorm)
            last_norm = [m for m in slots.pet_slot.modules() if isinstance(m, norms)][-1]
            last_norm.weight.zero_()
            last_norm.bias.zero_()


def _wrap(network: nn.Module, kinds: tuple[type, ...], wrap: Callable[[nn.Module], nn.Module]) -> None:
    """Replace every module of exactly one of the types `kinds` by `wrap(module)`, wherever it is registered
    (nnU-Net's conv blocks hold their convolution and norm twice: as ``conv`` and in ``all_modules``)."""
    wrapped: dict[int, nn.Module] = {}
    for name, module in list(network.named_modules(remove_duplicate=False)):
        if type(module) in kinds:  # noqa: E721 - plain layers only
            replacement = wrapped.setdefault(id(module), wrap(module))
            parent_name, _, child = name.rpartition(".")
            setattr(network.get_submodule(parent_name) if parent_name else network, child, replacement)


def pemma_unet(unet: nn.Module, adaptation: Adaptation, input_modalities: Sequence[str]) -> nn.Module:
    """The PEMMA form of a CT nnU-Net U-Net, in place (its parameters are kept and the adapters start at zero).

    Args:
        unet: nnU-Net's ``PlainConvUNet`` or ``ResidualEncoderUNet`` with one input channel, as nnU-Net builds it.
        adaptation: the preset's adaptation section (``method`` a conv method, e.g. "conv_lora").
        input_modalities: the modalities of the input channels, in order, e.g. ``("CT", "PET")``.
    """
    if type(unet).__name__ not in SUPPORTED_UNETS:
        raise PlansError(f"PEMMA adapts nnU-Net's {' and '.join(SUPPORTED_UNETS)}, not {type(unet).__name__}")
    method = get_conv_method(adaptation.method)
    stage = unet.get_submodule(input_stage_name(unet))
    if isinstance(stage, nn.Sequential):  # its forward would run the PET slot added to it
        raise PlansError(f"the input stage of this {type(unet).__name__} is a sequence of {len(stage)} modules "
                         f"(pooling first?): PEMMA needs one block that reads the image")
    pet_slot = copy.deepcopy(stage) if adaptation.pet_init != "random" else fresh_copy(stage)
    _wrap(unet, (nn.Conv2d, nn.Conv3d), lambda conv: method.wrap_conv(conv, adaptation))  # the PET slot is apart
    methods: tuple[AdapterMethod, ...] = (MODALITY_SLOTS, method)
    if adaptation.ct_only_adapters:
        methods += (CT_LORA,)
    if adaptation.train_norms:
        _wrap(unet, (nn.InstanceNorm2d, nn.InstanceNorm3d), wrap_norm)
        methods += (NORM_SHIFT,)
    extend_class(stage, ModalitySlotInput)
    stage.pet_slot = pet_slot
    beta = torch.tensor(float(adaptation.beta))
    if adaptation.learnable_beta:
        stage.pet_beta = nn.Parameter(beta)
    else:
        stage.register_buffer("pet_beta", beta)
    stage.missing_modality = adaptation.missing_modality
    stage.keep = None
    extend_class(unet, PEMMA)
    unet.adaptation, unet.adapter_methods = adaptation, methods
    unet.set_input_modalities(input_modalities)
    unet.init_pet_modules()
    return unet
