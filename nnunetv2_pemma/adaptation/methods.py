"""Which parameters each adaptation method adds, and which of them train in each stage: declared once.

As peft's ``adapter_layer_names``, a method names the parameters it adds by a prefix of their last name part; base
parameter names never change inside an adapted network. Freezing, adapter files, checkpoint checks and base
loading all read this declaration through :func:`added_by` / :func:`trainable_in`, so a new method (prior tokens,
mixtures of adapters) joins with one :func:`register` call and no edit elsewhere.

Stages: "adaptation" (CT base -> CT+PET, the base frozen), "continual" (updates on new data, any modality) and
"clinical" (a CT+PET prognosis model -> CT+PET+clinical: the clinical token and the qkv adapters train).

The qkv methods (a preset's ``adaptation.method`` for a transformer): LoRA, DoRA, context priors (LoRA plus prior
tokens, ``priors.py``) and a mixture of LoRA experts (``mixture.py``). The conv methods (``adaptation.method`` for
nnU-Net's CNN U-Nets): conv LoRA around every convolution (``conv_layers.py``), optionally with shifts of the
normalisation layers' affine parameters (``norm_layers.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from torch import nn

from nnunetv2_pemma.adaptation.conv_layers import wrap_conv
from nnunetv2_pemma.adaptation.layers import LoRAQKVLinear
from nnunetv2_pemma.adaptation.mixture import MoALoRAQKVLinear, expert_keys
from nnunetv2_pemma.errors import PlansError

if TYPE_CHECKING:
    from nnunetv2_pemma.config import Adaptation

Stage = Literal["adaptation", "continual", "clinical"]
STAGES: tuple[Stage, ...] = ("adaptation", "continual", "clinical")

QKVWrapper = Callable[[nn.Linear, "Adaptation"], nn.Module]
ConvWrapper = Callable[[nn.Module, "Adaptation"], nn.Module]


@dataclass(frozen=True)
class AdapterMethod:
    """One adaptation method.

    Attributes:
        name: its name in presets (``adaptation.method``) and in the registry.
        prefixes: every parameter (or buffer) it adds has a name part starting with one of these.
        trains: per stage, the prefixes whose parameters train (the rest of the network is frozen).
        wrap_qkv: for methods that adapt attention, how a fused qkv ``nn.Linear`` is wrapped for a preset's
            adaptation section.
        wrap_conv: for methods that adapt convolutions, how a plain ``nn.Conv2d``/``nn.Conv3d`` is wrapped.
    """

    name: str
    prefixes: tuple[str, ...]
    trains: dict[Stage, tuple[str, ...]] = field(default_factory=dict)
    wrap_qkv: QKVWrapper | None = None
    wrap_conv: ConvWrapper | None = None


REGISTRY: dict[str, AdapterMethod] = {}


def register(method: AdapterMethod) -> AdapterMethod:
    """Add a method to the registry (variants of one layer, as LoRA and DoRA, may share prefixes)."""
    if method.name in REGISTRY:
        raise ValueError(f"adapter method {method.name!r} is registered already")
    REGISTRY[method.name] = method
    return method


def _lora(use_dora: bool) -> QKVWrapper:
    def wrap(linear: nn.Linear, adaptation: Adaptation) -> nn.Module:
        return LoRAQKVLinear(linear, adaptation.lora_rank, adaptation.lora_alpha, use_dora=use_dora)

    return wrap


def _mixture(linear: nn.Linear, adaptation: Adaptation) -> nn.Module:
    keys = expert_keys(adaptation.moa_routing, adaptation.moa_experts, adaptation.moa_gate_experts)
    if not keys:
        raise PlansError("a centre-routed mixture of adapters needs its experts' centres (adaptation.moa_experts); "
                         "the MoA trainers fill them in from the training data")
    return MoALoRAQKVLinear(linear, adaptation.lora_rank, adaptation.lora_alpha, keys,
                            gate=adaptation.moa_routing == "gate")


MODALITY_SLOTS = register(AdapterMethod(
    "modality_slots", prefixes=("pet_",), trains={"adaptation": ("pet_",)}))
"""PEMMA's PET branch: PET patch embedding, PET input skip, its weight beta (and Swin's fusion conv)."""

CLINICAL_SLOT = register(AdapterMethod("clinical_slot", prefixes=("ehr_",), trains={"clinical": ("ehr_",)}))
"""The clinical (EHR) token a prognosis model adds in the "clinical" stage: its embedding and position."""

LORA = register(AdapterMethod("lora", prefixes=("lora_",), trains={s: ("lora_",) for s in STAGES},
                              wrap_qkv=_lora(use_dora=False)))
DORA = register(AdapterMethod("dora", prefixes=("lora_",), trains={s: ("lora_",) for s in STAGES},
                              wrap_qkv=_lora(use_dora=True)))
PRIOR = register(AdapterMethod("prior", prefixes=("lora_", "prior_"),
                               trains={"adaptation": ("lora_", "prior_"), "continual": ("lora_", "prior_"),
                                       "clinical": ("lora_",)},
                               wrap_qkv=_lora(use_dora=False)))
"""LoRA on Q and V plus the network's ``prior_context`` (prior tokens, and for Hermes-style entry its fusion)."""
MOA = register(AdapterMethod("moa", prefixes=("moa_",), trains={s: ("moa_",) for s in STAGES}, wrap_qkv=_mixture))
"""LoRA experts (``moa_experts.<key>``) and, with gate routing, ``moa_gate``; which experts a continual update
trains is the trainer's choice (the new centre's), see ``trainers/adaptation/mixture.py``."""


def _conv_lora(conv: nn.Module, adaptation: Adaptation) -> nn.Module:
    return wrap_conv(conv, adaptation.lora_rank, adaptation.lora_alpha, ct_only=adaptation.ct_only_adapters)


CONV_LORA = register(AdapterMethod("conv_lora", prefixes=("conv_lora_",), trains={s: ("conv_lora_",) for s in STAGES},
                                   wrap_conv=_conv_lora))
"""Conv LoRA around every frozen convolution of a CNN U-Net's encoder and decoder (``adaptation.method``
"conv_lora" of an nnU-Net preset)."""

CT_LORA = register(AdapterMethod("ct_lora", prefixes=("ct_lora_",), trains={"continual": ("ct_lora_",)}))
"""The CT-only pair of every conv LoRA (``adaptation.ct_only_adapters``): zero after the adaptation, so CT alone
is the base; trained only by continual updates whose inputs include CT alone, and never acting on CT+PET or PET
input (``conv_layers.RoutedLoRAConv3d``)."""

NORM_SHIFT = register(AdapterMethod("norm_shift", prefixes=("norm_shift_",),
                                    trains={s: ("norm_shift_",) for s in STAGES}))
"""Trainable shifts of the frozen normalisation layers' scale and bias (``adaptation.train_norms``), AdaBN-style
adaptation of a CNN's feature statistics that leaves the base's own norm parameters untouched."""

INPUT_SKIP = register(AdapterMethod("input_skip", prefixes=("conv_lora_",), trains={"continual": ("conv_lora_",)}))
"""Conv LoRA on the CT input skip's convolutions (``adaptation.input_skip_adapter``), trained in continual updates
only: the adaptation to PET leaves the CT path as the base had it."""


def qkv_methods() -> tuple[str, ...]:
    """Names of the registered methods that adapt attention (valid values of a preset's ``adaptation.method``)."""
    return tuple(name for name, m in REGISTRY.items() if m.wrap_qkv is not None)


def conv_methods() -> tuple[str, ...]:
    """Names of the registered methods that adapt convolutions (``adaptation.method`` of a CNN preset)."""
    return tuple(name for name, m in REGISTRY.items() if m.wrap_conv is not None)


def get_conv_method(name: str) -> AdapterMethod:
    if name not in REGISTRY or REGISTRY[name].wrap_conv is None:
        raise PlansError(f"adaptation method {name!r} does not adapt convolutions: nnU-Net's U-Nets take one of "
                         f"{list(conv_methods())}")
    return REGISTRY[name]


def get_method(name: str) -> AdapterMethod:
    if name not in REGISTRY or REGISTRY[name].wrap_qkv is None:
        raise PlansError(f"adaptation method {name!r} is not one of {list(qkv_methods())}")
    return REGISTRY[name]


def _parts(name: str) -> list[str]:
    return name.split(".")


def added_by(name: str) -> str | None:
    """The prefix of the method that added the parameter or buffer `name`, or None for a base tensor.
    Wrapper prefixes (``module.``, ``_orig_mod.``) are ignored: any dotted part may carry the prefix."""
    prefixes = {p for m in REGISTRY.values() for p in m.prefixes}
    return next((p for part in _parts(name) for p in prefixes if part.startswith(p)), None)


def is_added(name: str) -> bool:
    """True for what an adaptation method added; False for the base network's own tensors."""
    return added_by(name) is not None


def trainable_in(name: str, stage: Stage, methods: Iterable[AdapterMethod]) -> bool:
    """Whether parameter `name` trains in `stage` when the network carries `methods`."""
    trained = {p for m in methods for p in m.trains.get(stage, ())}
    return added_by(name) in trained


def train_only(net: nn.Module, stage: Stage, methods: Iterable[AdapterMethod] | None = None) -> list[str]:
    """Freeze everything but what `methods` (default: the network's ``adapter_methods``) train in `stage`; return
    the names of the trainable parameters."""
    methods = tuple(net.adapter_methods if methods is None else methods)
    names = []
    for name, p in net.named_parameters():
        p.requires_grad_(trainable_in(name, stage, methods))
        if p.requires_grad:
            names.append(name)
    return names
