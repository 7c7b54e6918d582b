"""PEMMA on UNETR: PET tokens go through the ViT next to the CT tokens; only the CT tokens reach the decoder."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import PatchEmbeddingBlock
from monai.networks.nets import UNETR

from nnunetv2_pemma.adaptation.priors import ContextPriors
from nnunetv2_pemma.config import MODALITIES, Adaptation
from nnunetv2_pemma.networks.backbones.unetr import (UNETREncoding, UNETRSpec, _explain, enable_sdpa,
                                                     freeze_unused_norms)
from nnunetv2_pemma.networks.modality_slots import ModalitySlots


class PEMMAUNETR(ModalitySlots, UNETR):
    """MONAI UNETR for CT plus the PEMMA modules that add PET (Fig. 1 of the paper).

    Added to MONAI's modules (``vit.*``, ``encoder1..4``, ``decoder2..5``, ``out``): ``pet_patch_embedding`` (PET
    tokens, with their own position embeddings), ``pet_encoder1`` (PET input skip), ``pet_beta`` and the qkv
    method's ``lora_*`` tensors on every attention layer. The encoder sees 2N tokens (CT then PET); the first N
    reach the decoder. The ``prior`` method adds ``prior_context`` (prior tokens per modality), which ``encode``
    runs the ViT blocks with.
    """

    def __init__(self, spec: UNETRSpec, adaptation: Adaptation, out_channels: int, img_size: Sequence[int],
                 input_modalities: Sequence[str] = MODALITIES) -> None:
        """
        Args:
            spec: the preset's model section, the same as the CT base was built with.
            adaptation: the preset's adaptation section.
            out_channels: segmentation classes including background.
            img_size: training patch size (D, H, W), each a multiple of 16.
            input_modalities: modalities of the input channels, in order, e.g. ``("CT", "PET")`` or ``("CT",)``.
        """
        img_size = spec.check_patch_size(img_size)
        kwargs = spec.kwargs()
        super().__init__(in_channels=1, out_channels=out_channels, img_size=img_size, **kwargs)
        self.img_size = img_size
        self.pet_patch_embedding = PatchEmbeddingBlock(
            in_channels=1, img_size=img_size, patch_size=self.patch_size, hidden_size=spec.hidden_size,
            num_heads=spec.num_heads, proj_type=spec.proj_type, dropout_rate=spec.dropout_rate)
        self._add_modality_slots(adaptation, input_modalities)
        enable_sdpa(self.vit)
        freeze_unused_norms(self.vit)

    def attention_layers(self) -> list[nn.Module]:
        return [blk.attn for blk in self.vit.blocks]

    def patch_embeddings(self) -> tuple[nn.Module, nn.Module]:
        return self.vit.patch_embedding, self.pet_patch_embedding

    def context_priors(self, adaptation: Adaptation) -> ContextPriors:
        blk = self.vit.blocks[0].attn
        return ContextPriors(blk.hidden_input_size, blk.num_heads, len(self.vit.blocks), adaptation.prior_tokens,
                             adaptation.prior_entry)

    def zero_pet_patch_embedding(self) -> None:
        """Zero the PET projection: PET tokens start as bare position embeddings."""
        for p in self.pet_patch_embedding.patch_embeddings.parameters():
            p.zero_()

    def encode(self, ct: torch.Tensor | None, pet: torch.Tensor | None,
               extra_tokens: Sequence[torch.Tensor] = ()) -> UNETREncoding:
        """CT and PET images (B, 1, D, H, W) -> the CT tokens the decoder reads (a PET-only input: PET's).

        extra_tokens: (B, k, hidden) each, e.g. a clinical token; they attend with the image tokens and are dropped
        with the PET tokens before the decoder.
        """
        tokens = []  # (B, N, hidden) each: CT first, so the first N tokens are the decoder's
        if ct is not None:
            tokens.append(self.vit.patch_embedding(ct))
        if pet is not None:
            tokens.append(self.pet_patch_embedding(pet))
        n = tokens[0].shape[1]
        x = torch.cat(tokens + list(extra_tokens), dim=1)
        if hasattr(self, "prior_context"):
            present = self.present  # set by split_modalities for this batch; direct calls: what is given
            if present is None or present.shape[0] != x.shape[0]:
                present = torch.tensor([[ct is not None, pet is not None]]).expand(x.shape[0], 2)
            x, hidden_states = self.prior_context.run_blocks(self.vit.blocks, x, n, present)
            return UNETREncoding(hidden_states, self.vit.norm(x[:, :n]))
        hidden_states = []
        for blk in self.vit.blocks:
            x = blk(x)
            hidden_states.append(x[:, :n])
        return UNETREncoding(hidden_states, self.vit.norm(x[:, :n]))

    def decode(self, encoded: UNETREncoding, skip: torch.Tensor) -> torch.Tensor:
        """As the second half of ``monai.networks.nets.UNETR.forward``, with ``skip`` for ``encoder1(x_in)``."""
        enc2 = self.encoder2(self.proj_feat(encoded.hidden_states[3]))
        enc3 = self.encoder3(self.proj_feat(encoded.hidden_states[6]))
        enc4 = self.encoder4(self.proj_feat(encoded.hidden_states[9]))
        dec3 = self.decoder5(self.proj_feat(encoded.tokens), enc4)
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        return self.out(self.decoder2(dec1, skip))

    def explain_base_mismatch(self, base: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
                              ) -> list[str]:
        other = ["it is a SwinUNETR (swinViT.* keys), not a UNETR: use PEMMASwinUNETR"
                 ] if any(k.startswith("swinViT.") for k in base) else []
        differing = [(k, tuple(base[k].shape), tuple(v.shape)) for k, v in expected.items()
                     if k in base and base[k].shape != v.shape]
        return other + [e for e in (_explain(k, b, n, self.img_size) for k, b, n in differing) if e]
