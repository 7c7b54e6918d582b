"""PEMMA: a CT UNETR adapted to CT+PET with a PET patch embedding, a parallel PET input skip and LoRA (Sec. 2.2)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from monai.networks.blocks import PatchEmbeddingBlock, UnetrBasicBlock
from monai.networks.nets import UNETR

from nnunetv2_pemma.errors import CheckpointError
from nnunetv2_pemma.networks.lora import ADAPTATION_METHODS, LoRAQKVLinear, add_lora_to_vit
from nnunetv2_pemma.networks.unetr import (MODALITIES, check_img_size, enable_sdpa, freeze_unused_norms,
                                           unetr_kwargs)

__all__ = [
    "IncompatibleBaseError",
    "PEMMAUNETR",
    "count_parameters",
    "freeze_for_adaptation",
    "freeze_for_continual",
    "is_pemma_parameter",
    "pemma_trainable_parameter_names",
    "sample_modality_masks",
]

PET_INITS = ("random", "zero", "cross")
MISSING_MODALITY_MODES = ("zero", "drop")
_ADAPTATION_KEYS = (
    "lora_rank",
    "lora_alpha",
    "pet_init",
    "beta",
    "learnable_beta",
    "missing_modality",
    "modality_dropout",
)
_OPTIONAL_ADAPTATION_KEYS = ("method",)  # "lora" (the paper) when absent, or "dora"


class IncompatibleBaseError(CheckpointError, ValueError):
    """A state dict is not a CT UNETR this PEMMA network can adapt; the message names what differs."""


def _check_adaptation(adaptation: Mapping[str, Any]) -> dict[str, Any]:
    missing = [k for k in _ADAPTATION_KEYS if k not in adaptation]
    unknown = sorted(set(adaptation) - set(_ADAPTATION_KEYS) - set(_OPTIONAL_ADAPTATION_KEYS))
    if missing or unknown:
        raise ValueError(f"preset 'adaptation' section: missing keys {missing}, unknown keys {unknown}")
    ad = dict(adaptation)
    ad.setdefault("method", "lora")
    if ad["method"] not in ADAPTATION_METHODS:
        raise ValueError(f"method must be one of {ADAPTATION_METHODS}, got {ad['method']!r}")
    if ad["pet_init"] not in PET_INITS:
        raise ValueError(f"pet_init must be one of {PET_INITS}, got {ad['pet_init']!r}")
    if ad["missing_modality"] not in MISSING_MODALITY_MODES:
        raise ValueError(f"missing_modality must be one of {MISSING_MODALITY_MODES}, got {ad['missing_modality']!r}")
    probs = ad["modality_dropout"]
    if probs is not None:
        if len(probs) != 3 or min(probs) < 0 or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
            raise ValueError(f"modality_dropout must be probabilities [p_CP, p_C, p_P] summing to 1, got {probs}")
        ad["modality_dropout"] = tuple(float(p) for p in probs)
    return ad


def sample_modality_masks(probs: Sequence[float], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one pattern per sample (CT+PET, CT only, PET only with ``probs``) for modality dropout.

    Returns:
        ``(keep_ct, keep_pet)``: two boolean tensors of shape (batch_size,); never both False for a sample.
    """
    pattern = torch.multinomial(torch.tensor(probs, dtype=torch.float), batch_size, replacement=True)
    return pattern != 2, pattern != 1


class PEMMAUNETR(UNETR):
    """MONAI UNETR for CT plus the PEMMA modules that add PET (Fig. 1 of the paper).

    The base modules keep MONAI's names (``vit.*``, ``encoder1..4``, ``decoder2..5``, ``out``), so a CT UNETR
    state dict loads as is (:meth:`load_base_state_dict`). Added: ``pet_patch_embedding`` (PET tokens, with their
    own position embeddings), ``pet_encoder1`` (PET input skip, in parallel to ``encoder1``), ``pet_beta`` (skip
    weight) and ``lora_*`` factors on Q and V of every attention layer (plus ``lora_magnitude_*`` with DoRA).

    The encoder sees 2N tokens (CT then PET); only the first N reach the UNETR decoder, and the input skip is
    ``encoder1(ct) + pet_beta * pet_encoder1(pet)``.
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        adaptation: Mapping[str, Any],
        out_channels: int,
        img_size: Sequence[int],
        input_modalities: Sequence[str] = MODALITIES,
    ) -> None:
        """
        Args:
            model: preset ``model`` section, the same as the CT base was built with.
            adaptation: preset ``adaptation`` section (lora_rank, lora_alpha, pet_init, beta, learnable_beta,
                missing_modality, modality_dropout; optional method: "lora", the default, or "dora").
            out_channels: segmentation classes including background.
            img_size: training patch size (D, H, W), each a multiple of 16.
            input_modalities: modalities of the input channels, in order, e.g. ``("CT", "PET")`` or ``("CT",)``.
        """
        img_size = check_img_size(img_size)
        kwargs = unetr_kwargs(model)
        ad = _check_adaptation(adaptation)
        super().__init__(in_channels=1, out_channels=out_channels, img_size=img_size, **kwargs)
        self.img_size = img_size
        self.pet_patch_embedding = PatchEmbeddingBlock(
            in_channels=1,
            img_size=img_size,
            patch_size=self.patch_size,
            hidden_size=kwargs["hidden_size"],
            num_heads=kwargs["num_heads"],
            proj_type=kwargs["proj_type"],
            dropout_rate=kwargs["dropout_rate"],
        )
        self.pet_encoder1 = UnetrBasicBlock(
            spatial_dims=3,
            in_channels=1,
            out_channels=kwargs["feature_size"],
            kernel_size=3,
            stride=1,
            norm_name=kwargs["norm_name"],
            res_block=kwargs["res_block"],
        )
        beta = torch.tensor(float(ad["beta"]))
        self.pet_beta: torch.Tensor
        if ad["learnable_beta"]:
            self.pet_beta = nn.Parameter(beta)
        else:
            self.register_buffer("pet_beta", beta)
        add_lora_to_vit(self.vit, ad["lora_rank"], ad["lora_alpha"], ad["method"])
        enable_sdpa(self.vit)
        freeze_unused_norms(self.vit)
        self.pet_init: str = ad["pet_init"]
        self.missing_modality: str = ad["missing_modality"]
        self.modality_dropout: tuple[float, float, float] | None = ad["modality_dropout"]
        self.input_modalities: tuple[str, ...] = ()
        self.set_input_modalities(input_modalities)

    def set_input_modalities(self, modalities: Sequence[str]) -> None:
        """Declare which modalities the input channels hold, in order (flexible C, P or CP inference)."""
        mods = tuple(modalities)
        if not mods or len(set(mods)) != len(mods) or not set(mods) <= set(MODALITIES):
            raise ValueError(f"input modalities must be distinct names from {MODALITIES}, got {list(modalities)}")
        self.input_modalities = mods

    def load_base_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a CT UNETR state dict (from :func:`build_unetr`) into the base, then initialise PET (``pet_init``).

        Raises:
            IncompatibleBaseError: (a ValueError) naming the differing keys and what they imply, e.g. hidden size,
                patch size or input channels.
        """
        expected = {k: v for k, v in self.state_dict().items() if not is_pemma_parameter(k)}
        problems = _base_mismatches(state_dict, expected, self.img_size)
        if problems:
            raise IncompatibleBaseError(
                "state dict is not a CT UNETR base this PEMMA network can adapt (base vs network): "
                + "; ".join(problems)
            )
        self.load_state_dict(state_dict, strict=False)
        self.reset_adapters()
        self.init_pet_modules()

    def reset_adapters(self) -> None:
        """Re-initialise every qkv adapter against the newly loaded base: LoRA B = 0 and, for DoRA, magnitudes at
        the base rows' norms (those set at construction were the norms of the random weights now replaced)."""
        for m in self.modules():
            if isinstance(m, LoRAQKVLinear):
                m.reset_lora_parameters()

    @torch.no_grad()
    def init_pet_modules(self) -> None:
        """Initialise the PET branches per ``pet_init``.

        "cross" copies the CT patch embedding (incl. position embeddings) and ``encoder1`` into the PET ones.
        "zero" zeros the PET patch projection and the ``pet_encoder1`` convolutions that read the image: PET tokens
        start as bare position embeddings and the PET skip outputs exactly zero. "random" keeps the fresh init.
        """
        if self.pet_init == "cross":
            self.pet_patch_embedding.load_state_dict(self.vit.patch_embedding.state_dict())
            self.pet_encoder1.load_state_dict(self.encoder1.state_dict())
        elif self.pet_init == "zero":
            layer = self.pet_encoder1.layer
            # a res block reads the image in conv1 and in the residual conv3; zeroing conv1 alone leaves conv3's path
            input_convs = [layer.conv1] + ([layer.conv3] if hasattr(layer, "conv3") else [])
            for module in [self.pet_patch_embedding.patch_embeddings, *input_convs]:
                for p in module.parameters():
                    p.zero_()

    def _modality_inputs(self, x_in: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Split (B, C_in, D, H, W) into CT and PET, each (B, 1, D, H, W), or None if dropped (missing, "drop")."""
        if x_in.shape[1] != len(self.input_modalities):
            raise ValueError(
                f"input has {x_in.shape[1]} channels, expected {len(self.input_modalities)} ({self.input_modalities})"
            )
        channels = {m: x_in[:, i : i + 1] for i, m in enumerate(self.input_modalities)}
        ct, pet = channels.get("CT"), channels.get("PET")
        if self.training and self.modality_dropout is not None and ct is not None and pet is not None:
            keep_ct, keep_pet = sample_modality_masks(self.modality_dropout, x_in.shape[0])
            ct = ct * keep_ct.view(-1, 1, 1, 1, 1).to(ct)
            pet = pet * keep_pet.view(-1, 1, 1, 1, 1).to(pet)
        if self.missing_modality == "zero":  # the paper: a missing modality is a zero image (normalised space)
            ct = torch.zeros_like(pet) if ct is None else ct
            pet = torch.zeros_like(ct) if pet is None else pet
        return ct, pet

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x_in: (B, len(input_modalities), D, H, W), channels in the order of ``input_modalities``.

        Returns:
            logits, (B, out_channels, D, H, W).
        """
        ct, pet = self._modality_inputs(x_in)
        tokens = []  # (B, N, hidden) each: CT first, so the first N tokens are the decoder's
        if ct is not None:
            tokens.append(self.vit.patch_embedding(ct))
        if pet is not None:
            tokens.append(self.pet_patch_embedding(pet))
        n = tokens[0].shape[1]
        x = torch.cat(tokens, dim=1)
        hidden_states_out = []
        for blk in self.vit.blocks:
            x = blk(x)
            hidden_states_out.append(x[:, :n])
        x = self.vit.norm(x[:, :n])

        enc1 = self.encoder1(ct) if ct is not None else None
        if pet is not None:
            z_pet = self.pet_beta * self.pet_encoder1(pet)
            enc1 = z_pet if enc1 is None else enc1 + z_pet

        # from here on as monai.networks.nets.UNETR.forward
        enc2 = self.encoder2(self.proj_feat(hidden_states_out[3]))
        enc3 = self.encoder3(self.proj_feat(hidden_states_out[6]))
        enc4 = self.encoder4(self.proj_feat(hidden_states_out[9]))
        dec4 = self.proj_feat(x)
        dec3 = self.decoder5(dec4, enc4)
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        out = self.decoder2(dec1, enc1)
        return self.out(out)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _shape(t: Sequence[int]) -> str:
    return "x".join(str(s) for s in t)


def _grid(n_patches: int) -> str:
    side = round(n_patches ** (1 / 3))
    return f"{16 * side}^3" if side**3 == n_patches else f"{n_patches} patches of 16^3"


def _explain(key: str, base: tuple[int, ...], net: tuple[int, ...], img_size: tuple[int, ...]) -> str | None:
    """Name the hyper-parameter behind a shape difference of a telltale key (base vs network)."""
    if key == "vit.norm.weight":
        return f"hidden size {base[0]} vs {net[0]}"
    if key == "vit.patch_embedding.position_embeddings" and base[1] != net[1]:
        size = f"{img_size[0]}^3" if len(set(img_size)) == 1 else _shape(img_size)
        return f"position embeddings {_shape(base)} vs {_shape(net)}: patch size differs ({_grid(base[1])} vs {size})"
    if key == "encoder1.layer.conv1.conv.weight" and base[1] != net[1]:
        return f"input channels {base[1]} vs {net[1]}: the base must be a single-channel CT UNETR"
    if key == "encoder1.layer.conv1.conv.weight" and base[0] != net[0]:
        return f"feature size {base[0]} vs {net[0]}"
    if key == "vit.blocks.0.mlp.linear1.weight" and base[0] != net[0]:
        return f"mlp dim {base[0]} vs {net[0]}"
    if key == "out.conv.conv.weight" and base[0] != net[0]:
        return f"output channels {base[0]} vs {net[0]}"
    return None


def _base_mismatches(
    state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], img_size: tuple[int, ...]
) -> list[str]:
    """What keeps ``state_dict`` from loading into the base modules whose state is ``expected``."""
    problems = []
    pemma = [k for k in state_dict if is_pemma_parameter(k)]
    if pemma:
        problems.append(f"it holds PEMMA parameters ({pemma[0]}, ...): load PEMMA checkpoints with load_state_dict")
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected and not is_pemma_parameter(k)]
    if missing:
        problems.append(f"{_count(len(missing), 'key')} missing, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{_count(len(unexpected), 'unexpected key')}, e.g. {unexpected[:3]}")
    differing = [
        (k, tuple(state_dict[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    explained = [e for e in (_explain(k, b, n, img_size) for k, b, n in differing) if e]
    problems.extend(dict.fromkeys(explained))  # unique, in order
    if differing:
        examples = ", ".join(f"{k} {_shape(b)} vs {_shape(n)}" for k, b, n in differing[:3])
        problems.append(f"{_count(len(differing), 'tensor')} of different shape, e.g. {examples}")
    return problems


def is_pemma_parameter(name: str) -> bool:
    """True for parameters PEMMA adds (``pet_*`` modules, ``lora_*`` factors); wrapper prefixes are ignored."""
    return any(part.startswith(("pet_", "lora_")) for part in name.split("."))


def _is_lora(name: str) -> bool:
    return name.rsplit(".", 1)[-1].startswith("lora_")


def _train_only(net: nn.Module, trainable: Callable[[str], bool]) -> list[str]:
    names = []
    for name, p in net.named_parameters():
        p.requires_grad_(trainable(name))
        if p.requires_grad:
            names.append(name)
    return names


def pemma_trainable_parameter_names(net: nn.Module) -> list[str]:
    """Parameters learned in multi-modal adaptation: PET patch embedding, PET skip, LoRA (DoRA), learnable beta."""
    return [name for name, _ in net.named_parameters() if is_pemma_parameter(name)]


def freeze_for_adaptation(net: nn.Module) -> list[str]:
    """Multi-modal adaptation: train the PEMMA parameters, freeze the base; return the trainable names."""
    return _train_only(net, is_pemma_parameter)


def freeze_for_continual(net: nn.Module) -> list[str]:
    """Continual fine-tuning on new data (one or both modalities): only the LoRA factors (and DoRA magnitudes) train.

    Returns the trainable names.
    """
    return _train_only(net, _is_lora)


def count_parameters(net: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    params = list(net.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
