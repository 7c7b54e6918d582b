"""The modality-slot interface PEMMA networks share, whatever their backbone.

A backbone (UNETR, SwinUNETR) implements ``encode`` (CT and PET images -> encoder output) and ``decode`` (encoder
output + input skip -> logits), plus how its PET patch embedding starts; this mixin does the rest once: which
modality each input channel holds, modality dropout, filling an absent modality, the parallel PET input skip
``z = z_CT + beta * z_PET``, loading a CT base and initialising the PET branch. A survival head can read
``encode``'s output; a new fusion variant overrides ``encode`` and nothing else.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from nnunetv2_pemma.adaptation.layers import LoRAQKVLinear
from nnunetv2_pemma.adaptation.conv_layers import LoRAConv2d, LoRAConv3d, wrap_conv
from nnunetv2_pemma.adaptation.methods import INPUT_SKIP, MODALITY_SLOTS, AdapterMethod, get_method, is_added
from nnunetv2_pemma.adaptation.mixture import moa_layers, routing_weights
from nnunetv2_pemma.config import MODALITIES, Adaptation
from nnunetv2_pemma.networks.mismatch import IncompatibleBaseError, base_mismatches


def check_modalities(modalities: Sequence[str]) -> tuple[str, ...]:
    mods = tuple(modalities)
    if not mods or len(set(mods)) != len(mods) or not set(mods) <= set(MODALITIES):
        raise ValueError(f"input modalities must be distinct names from {MODALITIES}, got {list(modalities)}")
    return mods


def sample_modality_masks(probs: Sequence[float], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one pattern per sample (CT+PET, CT only, PET only with ``probs``) for modality dropout.

    Returns:
        ``(keep_ct, keep_pet)``: two boolean tensors of shape (batch_size,); never both False for a sample.
    """
    pattern = torch.multinomial(torch.tensor(probs, dtype=torch.float), batch_size, replacement=True)
    return pattern != 2, pattern != 1


def fresh_copy(module: nn.Module) -> nn.Module:
    """Same architecture as ``module``, parameters freshly initialised (PyTorch defaults)."""
    new = copy.deepcopy(module)
    for m in new.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return new


def count_parameters(net: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    params = list(net.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


class ModalitySlots(nn.Module):
    """Mixin for a MONAI network adapted from CT to CT+PET (listed before the MONAI class in the bases).

    Base modules keep MONAI's names, so a CT state dict loads as is (:meth:`load_base_state_dict`). What the
    adaptation methods add is declared in ``adapter_methods`` (modality slots: ``pet_*``; the qkv method:
    ``lora_*``), which freezing, adapter files and checks read.
    """

    encoder1: nn.Module
    pet_encoder1: nn.Module
    pet_beta: torch.Tensor
    adapter_methods: tuple[AdapterMethod, ...]

    def _add_modality_slots(self, adaptation: Adaptation, input_modalities: Sequence[str]) -> None:
        """Add the PET input skip and beta and record the adaptation settings; call after the MONAI constructor
        and after the backbone has added its PET patch embedding."""
        self.pet_encoder1 = fresh_copy(self.encoder1)
        beta = torch.tensor(float(adaptation.beta))
        if adaptation.learnable_beta:
            self.pet_beta = nn.Parameter(beta)
        else:
            self.register_buffer("pet_beta", beta)
        method = get_method(adaptation.method)
        self.adapter_methods = (MODALITY_SLOTS, method)
        for parent in self.attention_layers():
            parent.qkv = method.wrap_qkv(parent.qkv, adaptation)
        if method.name == "prior":
            self.prior_context = self.context_priors(adaptation)
        if adaptation.input_skip_adapter:
            self._wrap_input_skip(adaptation)
        self.adaptation = adaptation
        self.input_modalities = check_modalities(input_modalities)
        self.centers: Sequence[str | None] | str | None = None
        self.present: torch.Tensor | None = None  # (B, 2) bool of the running forward: CT, PET held

    def _wrap_input_skip(self, adaptation: Adaptation) -> None:
        """Conv LoRA around every convolution of the CT input skip (``encoder1``; PET's keeps its own weights)."""
        for name, module in list(self.encoder1.named_modules()):
            if type(module) in (nn.Conv2d, nn.Conv3d):  # noqa: E721 - plain convolutions only
                parent_name, _, child = name.rpartition(".")
                parent = self.encoder1.get_submodule(parent_name) if parent_name else self.encoder1
                setattr(parent, child, wrap_conv(module, adaptation.lora_rank, adaptation.lora_alpha))
        self.adapter_methods += (INPUT_SKIP,)

    # --- what a backbone implements (each PEMMA backbone overrides all of these) --------------------------------------
    def attention_layers(self) -> list[nn.Module]:
        """The attention modules whose fused ``qkv`` layer the qkv method wraps."""
        raise NotImplementedError

    def encode(self, ct: torch.Tensor | None, pet: torch.Tensor | None) -> Any:
        """The encoder's output for the CT and PET images (B, 1, D, H, W) (either may be None: absent, "drop")."""
        raise NotImplementedError

    def decode(self, encoded: Any, skip: torch.Tensor) -> torch.Tensor:
        """Logits (B, out_channels, D, H, W) from ``encode``'s output and the input skip (B, F, D, H, W)."""
        raise NotImplementedError

    def patch_embeddings(self) -> tuple[nn.Module, nn.Module]:
        """(CT patch embedding, PET patch embedding)."""
        raise NotImplementedError

    def zero_pet_patch_embedding(self) -> None:
        """Make PET's patch features independent of the image (``pet_init`` "zero")."""
        raise NotImplementedError

    def explain_base_mismatch(self, base: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
                              ) -> list[str]:
        """The hyper-parameters behind the differences between a base state dict and this network's base."""
        raise NotImplementedError

    def context_priors(self, adaptation: Adaptation) -> nn.Module:
        """The ``prior`` method's module (``adaptation.priors.ContextPriors``), which ``encode`` must use."""
        raise NotImplementedError

    # --- shared ------------------------------------------------------------------------------------------------
    def set_input_modalities(self, modalities: Sequence[str]) -> None:
        """Declare which modalities the input channels hold, in order (flexible C, P or CP inference)."""
        self.input_modalities = check_modalities(modalities)

    def set_centers(self, centers: Sequence[str | None] | str | None) -> None:
        """The centre of each sample of the next forwards (one name: every sample's; None: unknown), which a
        centre-routed mixture of adapters routes by."""
        self.centers = centers

    def route(self, present: torch.Tensor) -> None:
        """Tell the routed adapters what each sample holds before the forward: ``present`` (B, 2) bool, CT and PET.
        MONAI's attention passes its qkv layer nothing but the tokens, so the mixture's weights are set on the
        layers here; prior tokens read ``self.present``."""
        self.present = present
        layers = moa_layers(self)
        if not layers:
            return
        centers = [self.centers] * len(present) if isinstance(self.centers, str) else self.centers
        weights = routing_weights(self.adaptation.moa_routing, layers[0].keys, present, centers)
        for layer in layers:
            layer.route = weights

    def split_modalities(self, x_in: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Split (B, C_in, D, H, W) into CT and PET, each (B, 1, D, H, W), or None if absent in "drop" mode;
        in training, modality dropout blanks one of them per sample. Routes the adapters by what each sample
        holds (``route``)."""
        if x_in.shape[1] != len(self.input_modalities):
            raise ValueError(
                f"input has {x_in.shape[1]} channels, expected {len(self.input_modalities)} ({self.input_modalities})"
            )
        channels = {m: x_in[:, i : i + 1] for i, m in enumerate(self.input_modalities)}
        ct, pet = channels.get("CT"), channels.get("PET")
        present = torch.tensor([[ct is not None, pet is not None]]).expand(x_in.shape[0], 2)
        probs = self.adaptation.modality_dropout
        if self.training and probs is not None and ct is not None and pet is not None:
            keep_ct, keep_pet = sample_modality_masks(probs, x_in.shape[0])
            ct = ct * keep_ct.view(-1, 1, 1, 1, 1).to(ct)
            pet = pet * keep_pet.view(-1, 1, 1, 1, 1).to(pet)
            present = torch.stack([keep_ct, keep_pet], dim=1)
        self.route(present)
        if self.adaptation.missing_modality == "zero":  # the paper: a missing modality is a zero image
            ct = torch.zeros_like(pet) if ct is None else ct
            pet = torch.zeros_like(ct) if pet is None else pet
        return ct, pet

    def input_skip(self, ct: torch.Tensor | None, pet: torch.Tensor | None) -> torch.Tensor:
        """``encoder1(ct) + beta * pet_encoder1(pet)``, with an absent modality's term left out."""
        skip = self.encoder1(ct) if ct is not None else None
        if pet is not None:
            z_pet = self.pet_beta * self.pet_encoder1(pet)
            skip = z_pet if skip is None else skip + z_pet
        return skip

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x_in: (B, len(input_modalities), D, H, W), channels in the order of ``input_modalities``.

        Returns:
            logits, (B, out_channels, D, H, W).
        """
        ct, pet = self.split_modalities(x_in)
        return self.decode(self.encode(ct, pet), self.input_skip(ct, pet))

    def load_base_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a CT base state dict (the plain MONAI network's), reset the adapters, initialise PET.

        Raises:
            IncompatibleBaseError: (a ValueError) naming what differs, e.g. hidden size, patch size or channels.
        """
        expected = {k: v for k, v in self.state_dict().items() if not is_added(k)}
        problems = base_mismatches(state_dict, expected, self.explain_base_mismatch)
        if problems:
            raise IncompatibleBaseError(
                f"state dict is not a CT {self.backbone_name} base this PEMMA network can adapt (base vs network): "
                + "; ".join(problems))
        self.load_state_dict(state_dict, strict=False)
        self.reset_adapters()
        self.init_pet_modules()

    @property
    def backbone_name(self) -> str:
        return next(c.__name__ for c in type(self).__mro__ if c.__module__.startswith("monai."))

    def reset_adapters(self) -> None:
        """Re-initialise every adapter against the newly loaded base: LoRA B = 0 and, for DoRA, magnitudes at
        the base rows' norms (those set at construction were the norms of the random weights now replaced)."""
        for m in self.modules():
            if isinstance(m, (LoRAQKVLinear, LoRAConv2d, LoRAConv3d)):
                m.reset_lora_parameters()

    @torch.no_grad()
    def init_pet_modules(self) -> None:
        """Initialise the PET branch per ``pet_init``.

        "cross" copies the CT patch embedding and ``encoder1`` into the PET ones. "zero" makes the PET patch
        features independent of the image (``zero_pet_patch_embedding``) and zeros the ``pet_encoder1``
        convolutions that read the image, so the PET skip outputs exactly zero. "random" keeps the fresh init.
        """
        ct_embedding, pet_embedding = self.patch_embeddings()
        if self.adaptation.pet_init == "cross":
            pet_embedding.load_state_dict(ct_embedding.state_dict())
            self.pet_encoder1.load_state_dict({k: v for k, v in self.encoder1.state_dict().items() if not is_added(k)})
        elif self.adaptation.pet_init == "zero":
            self.zero_pet_patch_embedding()
            layer = self.pet_encoder1.layer
            # a res block reads the image in conv1 and in the residual conv3; zeroing conv1 alone leaves conv3's path
            for conv in [layer.conv1] + ([layer.conv3] if hasattr(layer, "conv3") else []):
                for p in conv.parameters():
                    p.zero_()
