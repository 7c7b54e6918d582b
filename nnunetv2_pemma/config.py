"""Presets and the plans' "pemma" block, parsed once into typed sections.

A preset file (`plans/<name>.json`) is checked when it is loaded; the block `pemma plans add/transfer` stores in an
nnU-Net plans configuration is parsed again when a trainer or the predictor reads it. Architecture-specific rules
(patch divisibility, model keys) belong to the architecture (`nnunetv2_pemma.networks.backbones`). Every problem
is a `PlansError` naming the preset file or plans configuration.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nnunetv2_pemma.adaptation.methods import conv_methods, qkv_methods
from nnunetv2_pemma.errors import PlansError
from nnunetv2_pemma.networks.backbones import ModelSpec, parse_model
from nnunetv2_pemma.training.augmentation import SECTION as AUGMENTATION_SECTION
from nnunetv2_pemma.training.augmentation import AugmentationChoice

PEMMA_KEY = "pemma"
MODALITIES = ("CT", "PET")
"""Modalities PEMMA knows, in the default channel order: the base model is CT-only, PET is added."""
PET_INITS = ("random", "zero", "cross")
MISSING_MODALITY_MODES = ("zero", "drop")
OPTIMIZERS = ("AdamW", "Adam", "SGD")  # SGD: nnU-Net's own (momentum 0.99, Nesterov, poly)
LR_SCHEDULES = ("constant", "poly")
TIES_METHODS = ("efron", "breslow")  # torchsurv's Cox partial likelihood with tied times
SURVIVAL_SECTION = "survival"
METHOD_OPTIONS = ("prior_tokens", "prior_entry", "moa_routing", "moa_experts", "moa_gate_experts", "train_norms",
                  "ct_only_adapters")
"""Adaptation options that shape the network of a method (beyond the method's name)."""


def _fields_of(cls: type, section: Any, name: str) -> dict[str, Any]:
    """The section as keyword arguments of dataclass `cls`; ValueError naming missing and unknown keys."""
    if not isinstance(section, Mapping):
        raise ValueError(f"'{name}' must be an object, got {section!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    required = [n for n, f in known.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in section]
    unknown = sorted(set(section) - set(known))
    if missing or unknown:
        raise ValueError(f"'{name}' section: missing keys {missing}, unknown keys {unknown}")
    return dict(section)


@dataclass(frozen=True)
class Adaptation:
    """The preset's ``adaptation`` section: how PET is added and what adapts attention."""

    lora_rank: int
    lora_alpha: float
    pet_init: str  # "cross" (copy CT's input layers), "zero" or "random"
    beta: float  # weight of the PET input skip: z = z_CT + beta * z_PET
    learnable_beta: bool
    missing_modality: str  # "zero" (the paper: a zero image) or "drop" (its tokens left out)
    modality_dropout: tuple[float, float, float] | None  # [p_CP, p_C, p_P] per training sample, or none
    method: str = "lora"  # a registered qkv adapter method: "lora", "dora", "prior" or "moa"
    prior_tokens: int = 10  # prior: learnable tokens per modality and presence state (Hermes: about 10)
    prior_entry: str = "fusion"  # prior: "fusion" (Hermes two-way attention) or "tokens" (new tokens every block)
    moa_routing: str = "center"  # moa: which expert a sample uses: "center", "modality" (C/P/CP) or "gate"
    moa_experts: tuple[str, ...] = ()  # moa "center": the experts' centres (the trainers fill them from the data)
    moa_gate_experts: int = 3  # moa "gate": how many experts the learned top-1 gate chooses from
    # continual updates also train a LoRA (lora_rank, lora_alpha) on the CT input skip's convolutions: what a new
    # centre's CT needs when it differs at the voxel level (contrast, README "Updates that learn a new centre")
    input_skip_adapter: bool = False
    # nnU-Net's CNNs: the normalisation layers' scale and bias shift by trained amounts (methods.NORM_SHIFT)
    train_norms: bool = False
    # nnU-Net's CNNs: CT-only input has its own adapter pair (methods.CT_LORA), trained only by CT-only updates
    ct_only_adapters: bool = False

    @classmethod
    def parse(cls, section: Any) -> "Adaptation":
        kwargs = _fields_of(cls, section, "adaptation")
        methods = qkv_methods() + conv_methods()
        if kwargs.get("method", "lora") not in methods:
            raise ValueError(f"adaptation method must be one of {list(methods)}, got {kwargs['method']!r}")
        if kwargs["pet_init"] not in PET_INITS:
            raise ValueError(f"pet_init must be one of {PET_INITS}, got {kwargs['pet_init']!r}")
        if kwargs["missing_modality"] not in MISSING_MODALITY_MODES:
            raise ValueError(f"missing_modality must be one of {MISSING_MODALITY_MODES}, got "
                             f"{kwargs['missing_modality']!r}")
        if not isinstance(kwargs["lora_rank"], int) or kwargs["lora_rank"] < 1:
            raise ValueError(f"lora_rank must be a positive integer, got {kwargs['lora_rank']!r}")
        _check_method_options(kwargs)
        for key in ("input_skip_adapter", "train_norms", "ct_only_adapters"):
            if not isinstance(kwargs.get(key, False), bool):
                raise ValueError(f"{key} must be true or false, got {kwargs[key]!r}")
        probs = kwargs["modality_dropout"]
        if probs is not None:
            if len(probs) != 3 or min(probs) < 0 or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
                raise ValueError(f"modality_dropout must be probabilities [p_CP, p_C, p_P] summing to 1, got {probs}")
            kwargs["modality_dropout"] = tuple(float(p) for p in probs)
        if kwargs.get("ct_only_adapters", False):
            if kwargs.get("train_norms", False):
                raise ValueError("ct_only_adapters and train_norms exclude each other: norm shifts act on every "
                                 "input, so CT alone would no longer be the base")
            if probs is not None and kwargs["modality_dropout"][0] + kwargs["modality_dropout"][2] == 0:
                raise ValueError("with ct_only_adapters, modality_dropout must draw CT+PET or PET: CT-only samples "
                                 "train nothing in the adaptation")
        return cls(**kwargs)

    def training_patterns(self) -> tuple[float, float, float] | None:
        """The modality dropout a CNN adaptation draws from: with ``ct_only_adapters`` CT alone is the base and
        trains nothing, so CT-only samples are left out (CT+PET and PET keep their proportion)."""
        if self.modality_dropout is None or not self.ct_only_adapters:
            return self.modality_dropout
        p_cp, _, p_p = self.modality_dropout
        return p_cp / (p_cp + p_p), 0.0, p_p / (p_cp + p_p)

    def with_method_options(self, other: "Adaptation") -> "Adaptation":
        """This section with `other`'s method options (prior tokens and entry; mixture routing and experts): what a
        continual update keeps from the model it updates, whose network they shape."""
        return dataclasses.replace(self, **{k: getattr(other, k) for k in METHOD_OPTIONS})

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["modality_dropout"] = None if self.modality_dropout is None else list(self.modality_dropout)
        out["moa_experts"] = list(self.moa_experts)
        return out


DEFAULT_ADAPTATION: dict[str, Any] = {"lora_rank": 4, "lora_alpha": 4, "pet_init": "cross", "beta": 1.0,
                                      "learnable_beta": False, "missing_modality": "zero", "modality_dropout": None}
"""The ``adaptation`` section of a preset that has none: a peer network trained from scratch adapts nothing, but
like every model here it takes an absent modality as a zero image."""


def _check_method_options(kwargs: dict[str, Any]) -> None:
    """The prior and mixture-of-adapters options of an ``adaptation`` section (checked whatever the method, so
    that a preset switched to another method later is still valid)."""
    from nnunetv2_pemma.adaptation.mixture import ROUTINGS, check_expert_keys
    from nnunetv2_pemma.adaptation.priors import PRIOR_ENTRIES

    for key in ("prior_tokens", "moa_gate_experts"):
        value = kwargs.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if kwargs.get("prior_entry", "fusion") not in PRIOR_ENTRIES:
        raise ValueError(f"prior_entry must be one of {list(PRIOR_ENTRIES)}, got {kwargs['prior_entry']!r}")
    if kwargs.get("moa_routing", "center") not in ROUTINGS:
        raise ValueError(f"moa_routing must be one of {list(ROUTINGS)}, got {kwargs['moa_routing']!r}")
    if "moa_experts" in kwargs:
        kwargs["moa_experts"] = check_expert_keys(kwargs["moa_experts"])


@dataclass(frozen=True)
class Schedule:
    """The preset's ``schedule`` section: optimiser, iteration budget, test-time mirroring."""

    optimizer: str
    initial_lr: float
    weight_decay: float
    lr_schedule: str
    num_iterations: int
    num_iterations_per_epoch: int
    num_val_iterations_per_epoch: int
    test_time_mirroring: bool = True

    @classmethod
    def parse(cls, section: Any) -> "Schedule":
        kwargs = _fields_of(cls, section, "schedule")
        if kwargs["optimizer"] not in OPTIMIZERS:
            raise ValueError(f"unsupported optimizer {kwargs['optimizer']!r} ({', '.join(OPTIMIZERS)} only)")
        if kwargs["lr_schedule"] not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule {kwargs['lr_schedule']!r} not in {list(LR_SCHEDULES)}")
        for key in ("num_iterations", "num_iterations_per_epoch", "num_val_iterations_per_epoch"):
            if not isinstance(kwargs[key], int) or kwargs[key] < 1:
                raise ValueError(f"schedule {key} must be a positive integer, got {kwargs[key]!r}")
        return cls(**kwargs)

    @property
    def epochs(self) -> tuple[int, int, int]:
        """(num_epochs, iterations per epoch, validation iterations per epoch) for the iteration budget."""
        return (max(1, math.ceil(self.num_iterations / self.num_iterations_per_epoch)),
                self.num_iterations_per_epoch, self.num_val_iterations_per_epoch)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Survival:
    """The preset's optional ``survival`` section, read by the prognosis trainers: the Cox loss's weight next to
    nnU-Net's segmentation loss (the two train jointly) and how tied relapse times are handled."""

    loss_weight: float = 0.1
    ties: str = "efron"

    @classmethod
    def parse(cls, section: Any) -> "Survival":
        kwargs = _fields_of(cls, section, SURVIVAL_SECTION)
        weight = kwargs.get("loss_weight", cls.loss_weight)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ValueError(f"survival loss_weight must be a positive number, got {weight!r}")
        if kwargs.get("ties", cls.ties) not in TIES_METHODS:
            raise ValueError(f"survival ties must be one of {list(TIES_METHODS)}, got {kwargs['ties']!r}")
        return cls(**kwargs)


def _survival(raw: Mapping[str, Any]) -> Survival:
    section = raw.get(SURVIVAL_SECTION)
    return Survival() if section is None else Survival.parse(section)


def _augmentation(raw: Mapping[str, Any]) -> AugmentationChoice:
    section = raw.get(AUGMENTATION_SECTION)
    return AugmentationChoice() if section is None else AugmentationChoice.parse(section)


@dataclass(frozen=True)
class Preset:
    """A preset file: the nnU-Net configuration it adds and the PEMMA sections."""

    name: str
    source: str  # the file it was read from, for messages
    configuration: str
    inherits_from: str
    patch_size: tuple[int, ...]
    batch_size: int
    model: ModelSpec
    adaptation: Adaptation
    schedule: Schedule
    augmentation: AugmentationChoice
    survival: Survival = Survival()
    description: str = ""

    @classmethod
    def parse(cls, raw: Any, name: str, source: str) -> "Preset":
        where = f"preset {source}"
        if not isinstance(raw, Mapping):
            raise PlansError(f"{where}: expected a JSON object")
        missing = {"configuration", "patch_size", "batch_size", "model", "schedule"} - raw.keys()
        if missing:
            raise PlansError(f"{where} lacks {sorted(missing)}")
        try:
            model = parse_model(raw["model"])
            patch = model.check_patch_size(raw["patch_size"])
            if not isinstance(raw["batch_size"], int) or raw["batch_size"] < 1:
                raise ValueError(f"batch_size must be a positive integer, got {raw['batch_size']!r}")
            adaptation = Adaptation.parse(raw.get("adaptation", DEFAULT_ADAPTATION))
            convolutional = model.architecture == "nnUNet"
            if "adaptation" in raw and (adaptation.method in conv_methods()) != convolutional:
                wanted = conv_methods() if convolutional else qkv_methods()
                raise ValueError(f"{model.architecture} presets adapt with one of {list(wanted)}, not "
                                 f"{adaptation.method!r}")
            return cls(name=raw.get("name", name), source=source, configuration=raw["configuration"],
                       inherits_from=raw.get("inherits_from", "3d_fullres"), patch_size=patch,
                       batch_size=raw["batch_size"], model=model,
                       adaptation=adaptation,
                       schedule=Schedule.parse(raw["schedule"]), augmentation=_augmentation(raw),
                       survival=_survival(raw), description=raw.get("description", ""))
        except (ValueError, TypeError) as e:
            raise PlansError(f"{where}: {e}") from None

    def block(self, input_modalities: tuple[str, ...]) -> "PemmaBlock":
        return PemmaBlock(self.name, self.model, self.adaptation, self.schedule, self.augmentation,
                          input_modalities, survival=self.survival)


@dataclass(frozen=True)
class PemmaBlock:
    """The "pemma" block of an nnU-Net plans configuration: the preset's sections plus what the dataset adds
    (its channels' modalities and, per modality, the normalisation the model was trained or adapted with)."""

    preset: str
    model: ModelSpec
    adaptation: Adaptation
    schedule: Schedule
    augmentation: AugmentationChoice
    input_modalities: tuple[str, ...]
    modality_normalization: dict[str, Any] = field(default_factory=dict)
    survival: Survival = Survival()

    @classmethod
    def parse(cls, block: Any, where: str) -> "PemmaBlock":
        try:
            modalities = tuple(block["input_modalities"])
            if not modalities or len(set(modalities)) != len(modalities) or not set(modalities) <= set(MODALITIES):
                raise ValueError(f"input_modalities must be distinct names from {MODALITIES}, got {list(modalities)}")
            return cls(preset=block["preset"], model=parse_model(block["model"]),
                       adaptation=Adaptation.parse(block["adaptation"]), schedule=Schedule.parse(block["schedule"]),
                       augmentation=_augmentation(block), input_modalities=modalities,
                       modality_normalization=dict(block.get("modality_normalization", {})),
                       survival=_survival(block))
        except (KeyError, ValueError, TypeError) as e:
            raise PlansError(f"{where}: the 'pemma' block is not valid ({type(e).__name__}: {e})") from None

    @classmethod
    def of(cls, configuration_manager: Any) -> "PemmaBlock":
        """The block of an nnU-Net ConfigurationManager; PlansError when it is not a PEMMA configuration."""
        block = configuration_manager.configuration.get(PEMMA_KEY)
        if block is None:
            raise PlansError("this plans configuration has no 'pemma' block: PEMMA trainers need a configuration "
                             "made by `pemma plans add DATASET --preset NAME` (e.g. 3d_unetr), not "
                             f"{configuration_manager.data_identifier}")
        return cls.parse(block, f"plans configuration {configuration_manager.data_identifier}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"preset": self.preset, "model": self.model.to_json(),
                               "adaptation": self.adaptation.to_json(), "schedule": self.schedule.to_json(),
                               "input_modalities": list(self.input_modalities)}
        if self.augmentation != AugmentationChoice():
            out[AUGMENTATION_SECTION] = dataclasses.asdict(self.augmentation)
        if self.modality_normalization:
            out["modality_normalization"] = self.modality_normalization
        if self.survival != Survival():
            out[SURVIVAL_SECTION] = dataclasses.asdict(self.survival)
        return out
