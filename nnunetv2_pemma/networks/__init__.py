"""Networks: the CT UNETR base and its PEMMA (CT+PET) adaptation."""

from nnunetv2_pemma.networks.lora import (
    ADAPTATION_METHODS,
    DoRAQKVLinear,
    LoRAQKVLinear,
    add_lora_to_vit,
    set_lora_enabled,
    wrap_qkv,
)
from nnunetv2_pemma.networks.pemma_unetr import (
    IncompatibleBaseError,
    PEMMAUNETR,
    count_parameters,
    freeze_for_adaptation,
    freeze_for_continual,
    is_pemma_parameter,
    pemma_trainable_parameter_names,
    sample_modality_masks,
)
from nnunetv2_pemma.networks.unetr import MODALITIES, build_unetr, check_img_size, unetr_kwargs

__all__ = [
    "ADAPTATION_METHODS",
    "MODALITIES",
    "DoRAQKVLinear",
    "IncompatibleBaseError",
    "LoRAQKVLinear",
    "PEMMAUNETR",
    "add_lora_to_vit",
    "build_unetr",
    "check_img_size",
    "count_parameters",
    "freeze_for_adaptation",
    "freeze_for_continual",
    "is_pemma_parameter",
    "pemma_trainable_parameter_names",
    "sample_modality_masks",
    "set_lora_enabled",
    "unetr_kwargs",
    "wrap_qkv",
]
