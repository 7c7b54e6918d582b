"""PEMMA on SwinUNETR (extended PEMMA): CT and PET patch features fused by a 1x1x1 convolution before the Swin stages.

Swin tokens live in local windows, so PET cannot be appended as extra tokens as in :class:`PEMMAUNETR`. Instead a
PET patch embedding runs in parallel to the CT one and ``pet_fusion`` merges the two feature maps; the input skip
and the qkv adapters are the modality slots' (:class:`ModalitySlots`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
from monai.networks.nets import SwinUNETR

from nnunetv2_pemma.config import MODALITIES, Adaptation
from nnunetv2_pemma.errors import PlansError
from nnunetv2_pemma.networks.backbones.swin import SwinUNETRSpec, explain_swin_mismatch
from nnunetv2_pemma.networks.modality_slots import ModalitySlots, fresh_copy


class PEMMASwinUNETR(ModalitySlots, SwinUNETR):
    """MONAI SwinUNETR for CT plus the PEMMA modules that add PET.

    Added to MONAI's modules (``swinViT.*``, ``encoder1..4``, ``encoder10``, ``decoder1..5``, ``out``):
    ``pet_patch_embed`` (the architecture of ``swinViT.patch_embed``), ``pet_fusion`` (1x1x1 conv, 2C -> C, over
    ``[CT features | PET features]``; it starts as the identity on the CT half with a zero PET half and bias, so
    adaptation starts from the base model's function), ``pet_encoder1``, ``pet_beta`` and the qkv method's
    ``lora_*`` tensors on every window attention.

    A missing modality in "drop" mode is left out: the fusion conv is then not used and the present modality's own
    patch features enter the Swin stages (CT only: exactly the base network plus its adapters).
    """

    def __init__(self, spec: SwinUNETRSpec, adaptation: Adaptation, out_channels: int, img_size: Sequence[int],
                 input_modalities: Sequence[str] = MODALITIES) -> None:
        """Arguments as :class:`PEMMAUNETR`'s, with the SwinUNETR model section; every side of ``img_size`` a
        multiple of 32."""
        super().__init__(in_channels=1, out_channels=out_channels, **spec.kwargs())
        self.img_size = spec.check_patch_size(img_size)
        self.pet_patch_embed = fresh_copy(self.swinViT.patch_embed)
        self.pet_fusion = nn.Conv3d(2 * spec.feature_size, spec.feature_size, kernel_size=1)
        self.reset_fusion()
        self._add_modality_slots(adaptation, input_modalities)

    def attention_layers(self) -> list[nn.Module]:
        return [blk.attn for n in range(1, 5) for blk in getattr(self.swinViT, f"layers{n}")[0].blocks]

    def patch_embeddings(self) -> tuple[nn.Module, nn.Module]:
        return self.swinViT.patch_embed, self.pet_patch_embed

    def context_priors(self, adaptation: Adaptation) -> nn.Module:
        raise PlansError("adaptation method 'prior' needs a ViT with global attention (UNETR): SwinUNETR's "
                         "shifted-window attention has no token sequence to add prior tokens to; use lora, dora "
                         "or moa")

    def zero_pet_patch_embedding(self) -> None:
        """The CT embedding's bias (and norm) with a zero projection weight: PET features start independent of the
        image (the Swin analogue of UNETR's bare position embeddings; all-zero features would leave the fusion
        conv's PET half and the PET projection without gradient for ever)."""
        self.pet_patch_embed.load_state_dict(self.swinViT.patch_embed.state_dict())
        self.pet_patch_embed.proj.weight.zero_()

    @torch.no_grad()
    def reset_fusion(self) -> None:
        """``pet_fusion`` = identity on the CT half, zero on the PET half, zero bias: the fused map is the CT map."""
        c = self.pet_fusion.out_channels
        self.pet_fusion.weight.zero_()
        self.pet_fusion.weight[:, :c].copy_(torch.eye(c).view(c, c, 1, 1, 1))
        self.pet_fusion.bias.zero_()

    @torch.no_grad()
    def init_pet_modules(self) -> None:
        """Reset ``pet_fusion`` to the CT identity, then initialise the PET branch (``ModalitySlots``)."""
        self.reset_fusion()
        super().init_pet_modules()

    def patch_features(self, ct: torch.Tensor | None, pet: torch.Tensor | None) -> torch.Tensor:
        """Patch-feature map (B, C, D/2, H/2, W/2) entering the Swin stages: both present -> fused, else one's own."""
        if ct is not None and pet is not None:
            both = torch.cat([self.swinViT.patch_embed(ct), self.pet_patch_embed(pet)], dim=1)
            return self.pet_fusion(both)
        return self.swinViT.patch_embed(ct) if ct is not None else self.pet_patch_embed(pet)

    def encode(self, ct: torch.Tensor | None, pet: torch.Tensor | None) -> list[torch.Tensor]:
        """``SwinTransformer.forward`` after its patch embedding: the 5 hidden states, from the patch features."""
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            self._check_input_size((ct if ct is not None else pet).shape[2:])
        vit = self.swinViT
        x = vit.pos_drop(self.patch_features(ct, pet))
        hidden_states = [vit.proj_out(x, self.normalize)]
        for n in range(1, 5):
            if vit.use_v2:
                x = getattr(vit, f"layers{n}c")[0](x.contiguous())
            x = getattr(vit, f"layers{n}")[0](x.contiguous())
            hidden_states.append(vit.proj_out(x, self.normalize))
        return hidden_states

    def decode(self, encoded: list[torch.Tensor], skip: torch.Tensor) -> torch.Tensor:
        """As the second half of ``monai.networks.nets.SwinUNETR.forward``, with ``skip`` for ``encoder1(x_in)``."""
        enc1 = self.encoder2(encoded[0])
        enc2 = self.encoder3(encoded[1])
        enc3 = self.encoder4(encoded[2])
        dec3 = self.decoder5(self.encoder10(encoded[4]), encoded[3])
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        dec0 = self.decoder2(dec1, enc1)
        return self.out(self.decoder1(dec0, skip))

    def explain_base_mismatch(self, base: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
                              ) -> list[str]:
        return explain_swin_mismatch(base, expected)
