"""PEMMA for SwinUNETR: a CT SwinUNETR adapted to CT+PET (extended PEMMA, Swin backbone).

Swin tokens live in local windows, so PET cannot be appended as extra tokens as in :class:`PEMMAUNETR`. Instead a
PET patch embedding runs in parallel to the CT one and a 1x1x1 convolution fuses the two patch-feature maps before
the Swin stages; the input skip gets a parallel PET block, and the fused ``qkv`` of every window attention gets
LoRA (or DoRA). Interface and workflow are those of :class:`PEMMAUNETR`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import SwinTransformer

from nnunetv2_pemma.networks.lora import wrap_qkv
from nnunetv2_pemma.networks.pemma_unetr import PEMMAUNETR, IncompatibleBaseError, _check_adaptation, is_pemma_parameter
from nnunetv2_pemma.networks.swin import check_swin_img_size, swin_unetr_kwargs
from nnunetv2_pemma.networks.unetr import MODALITIES

__all__ = ["PEMMASwinUNETR", "add_lora_to_swin"]

def add_lora_to_swin(swin: SwinTransformer, rank: int, alpha: float, method: str = "lora") -> list[nn.Module]:
    """Wrap the fused ``qkv`` of every block's window attention (``layersN[0].blocks[i].attn.qkv``) with LoRA/DoRA.

    The wrapper shares the base weight and bias, so base parameter names are unchanged. Returns the new layers.
    """
    layers = []
    for n in range(1, 5):
        for i, blk in enumerate(getattr(swin, f"layers{n}")[0].blocks):
            qkv = getattr(getattr(blk, "attn", None), "qkv", None)
            if type(qkv) is not nn.Linear:  # noqa: E721 - a subclass is an adapter already
                raise ValueError(
                    f"layers{n} block {i}: expected a plain fused qkv nn.Linear, got {type(qkv).__name__}"
                )
            blk.attn.qkv = wrap_qkv(qkv, rank, alpha, method)
            layers.append(blk.attn.qkv)
    return layers


def _fresh_copy(module: nn.Module) -> nn.Module:
    """Same architecture as ``module``, parameters freshly initialised (PyTorch defaults)."""
    new = copy.deepcopy(module)
    for m in new.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return new


class PEMMASwinUNETR(SwinUNETR):
    """MONAI SwinUNETR for CT plus the PEMMA modules that add PET.

    Base modules keep MONAI's names (``swinViT.*``, ``encoder1..4``, ``encoder10``, ``decoder1..5``, ``out``), so a
    CT SwinUNETR state dict loads as is (:meth:`load_base_state_dict`). Added, all named ``pet_*`` or ``lora_*``:

    - ``pet_patch_embed``: PET patch embedding, the architecture of ``swinViT.patch_embed``;
    - ``pet_fusion``: 1x1x1 conv, 2C -> C, over ``[CT features | PET features]``; it starts as the identity on the
      CT half with a zero PET half and bias, so adaptation starts from the base model's function;
    - ``pet_encoder1``: PET input skip in parallel to ``encoder1``: the skip is
      ``encoder1(ct) + pet_beta * pet_encoder1(pet)``;
    - ``pet_beta``: skip weight (buffer, or parameter with ``learnable_beta``);
    - ``lora_*`` (LoRA, or DoRA with ``adaptation["method"] == "dora"``) on every window attention's fused qkv.

    A missing modality (``missing_modality``): "zero" feeds a zero image (the paper). "drop" leaves it out: the
    fusion conv then is not used and the present modality's own patch features enter the Swin stages directly
    (CT only: exactly the base network plus LoRA, whatever the PET modules learnt; PET only: the PET patch
    features and PET skip alone, like PEMMAUNETR's PET-only token sequence).
    """

    set_input_modalities = PEMMAUNETR.set_input_modalities
    _modality_inputs = PEMMAUNETR._modality_inputs  # channel split, modality dropout, zero/drop: as for UNETR
    reset_adapters = PEMMAUNETR.reset_adapters  # LoRA B = 0, DoRA magnitudes at the loaded base's row norms

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
            model: preset ``model`` section (architecture "SwinUNETR"), the same as the CT base was built with.
            adaptation: preset ``adaptation`` section (lora_rank, lora_alpha, pet_init, beta, learnable_beta,
                missing_modality, modality_dropout; optional method "lora" | "dora").
            out_channels: segmentation classes including background.
            img_size: training patch size (D, H, W), each a multiple of 32.
            input_modalities: modalities of the input channels, in order, e.g. ``("CT", "PET")`` or ``("CT",)``.
        """
        kwargs = swin_unetr_kwargs(model)
        img_size = check_swin_img_size(img_size, kwargs["norm_name"])
        ad = _check_adaptation(adaptation)
        super().__init__(in_channels=1, out_channels=out_channels, **kwargs)
        self.img_size = img_size
        feature_size = kwargs["feature_size"]
        self.pet_patch_embed = _fresh_copy(self.swinViT.patch_embed)
        self.pet_fusion = nn.Conv3d(2 * feature_size, feature_size, kernel_size=1)
        self.pet_encoder1 = _fresh_copy(self.encoder1)
        beta = torch.tensor(float(ad["beta"]))
        self.pet_beta: torch.Tensor
        if ad["learnable_beta"]:
            self.pet_beta = nn.Parameter(beta)
        else:
            self.register_buffer("pet_beta", beta)
        self.reset_fusion()
        self.adaptation_method: str = ad["method"]
        add_lora_to_swin(self.swinViT, ad["lora_rank"], ad["lora_alpha"], ad["method"])
        self.pet_init: str = ad["pet_init"]
        self.missing_modality: str = ad["missing_modality"]
        self.modality_dropout: tuple[float, float, float] | None = ad["modality_dropout"]
        self.input_modalities: tuple[str, ...] = ()
        self.set_input_modalities(input_modalities)

    @torch.no_grad()
    def reset_fusion(self) -> None:
        """``pet_fusion`` = identity on the CT half, zero on the PET half, zero bias: the fused map is the CT map."""
        c = self.pet_fusion.out_channels
        self.pet_fusion.weight.zero_()
        self.pet_fusion.weight[:, :c].copy_(torch.eye(c).view(c, c, 1, 1, 1))
        self.pet_fusion.bias.zero_()

    def load_base_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a CT SwinUNETR state dict (from :func:`build_swin_unetr`), reset the adapters, initialise PET.

        Raises:
            IncompatibleBaseError: (a ValueError) naming what differs, e.g. feature size, depths, heads, window,
                input channels, use_v2 or qkv_bias.
        """
        expected = {k: v for k, v in self.state_dict().items() if not is_pemma_parameter(k)}
        problems = _base_mismatches(state_dict, expected)
        if problems:
            raise IncompatibleBaseError(
                "state dict is not a CT SwinUNETR base this PEMMA network can adapt (base vs network): "
                + "; ".join(problems)
            )
        self.load_state_dict(state_dict, strict=False)
        self.reset_adapters()
        self.init_pet_modules()

    @torch.no_grad()
    @torch.no_grad()
    def init_pet_modules(self) -> None:
        """Reset ``pet_fusion`` to the CT identity, then initialise the PET branches per ``pet_init``.

        "cross" copies the CT patch embedding and ``encoder1`` into the PET ones. "zero" gives the PET patch
        embedding the CT one's bias (and norm) but a zero projection weight, so PET features start independent of
        the image (the Swin analogue of UNETR's bare position embeddings; all-zero features would leave the fusion
        conv's PET half and the PET projection without gradient for ever), and zeros the ``pet_encoder1``
        convolutions that read the image, so the PET skip outputs exactly zero. "random" keeps the fresh init.
        """
        self.reset_fusion()
        if self.pet_init == "cross":
            self.pet_patch_embed.load_state_dict(self.swinViT.patch_embed.state_dict())
            self.pet_encoder1.load_state_dict(self.encoder1.state_dict())
        elif self.pet_init == "zero":
            self.pet_patch_embed.load_state_dict(self.swinViT.patch_embed.state_dict())
            self.pet_patch_embed.proj.weight.zero_()
            layer = self.pet_encoder1.layer
            for conv in [layer.conv1] + ([layer.conv3] if hasattr(layer, "conv3") else []):
                for p in conv.parameters():
                    p.zero_()

    def patch_features(self, ct: torch.Tensor | None, pet: torch.Tensor | None) -> torch.Tensor:
        """Patch-feature map (B, C, D/2, H/2, W/2) entering the Swin stages: both present -> fused, else one's own."""
        if ct is not None and pet is not None:
            both = torch.cat([self.swinViT.patch_embed(ct), self.pet_patch_embed(pet)], dim=1)
            return self.pet_fusion(both)
        return self.swinViT.patch_embed(ct) if ct is not None else self.pet_patch_embed(pet)

    def swin_stages(self, x0: torch.Tensor) -> list[torch.Tensor]:
        """``SwinTransformer.forward`` after its patch embedding: the 5 hidden states from patch features ``x0``."""
        vit = self.swinViT
        x = vit.pos_drop(x0)
        hidden_states = [vit.proj_out(x, self.normalize)]
        for n in range(1, 5):
            if vit.use_v2:
                x = getattr(vit, f"layers{n}c")[0](x.contiguous())
            x = getattr(vit, f"layers{n}")[0](x.contiguous())
            hidden_states.append(vit.proj_out(x, self.normalize))
        return hidden_states

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x_in: (B, len(input_modalities), D, H, W), channels in the order of ``input_modalities``; every side a
                multiple of 32.

        Returns:
            logits, (B, out_channels, D, H, W).
        """
        ct, pet = self._modality_inputs(x_in)
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            self._check_input_size(x_in.shape[2:])
        hidden_states_out = self.swin_stages(self.patch_features(ct, pet))
        enc0 = self.encoder1(ct) if ct is not None else None
        if pet is not None:
            z_pet = self.pet_beta * self.pet_encoder1(pet)
            enc0 = z_pet if enc0 is None else enc0 + z_pet

        # from here on as monai.networks.nets.SwinUNETR.forward
        enc1 = self.encoder2(hidden_states_out[0])
        enc2 = self.encoder3(hidden_states_out[1])
        enc3 = self.encoder4(hidden_states_out[2])
        dec4 = self.encoder10(hidden_states_out[4])
        dec3 = self.decoder5(dec4, hidden_states_out[3])
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        dec0 = self.decoder2(dec1, enc1)
        out = self.decoder1(dec0, enc0)
        return self.out(out)


# --- explaining an incompatible base ------------------------------------------------------------------------------

_BLOCK_KEY = re.compile(r"^swinViT\.layers(\d)\.0\.blocks\.(\d+)\.")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _shape(t: Sequence[int]) -> str:
    return "x".join(str(s) for s in t)


def _depths(keys: Sequence[str]) -> list[int]:
    depth = [0] * 4
    for k in keys:
        m = _BLOCK_KEY.match(k)
        if m and 1 <= int(m[1]) <= 4:
            depth[int(m[1]) - 1] = max(depth[int(m[1]) - 1], int(m[2]) + 1)
    return depth


def _stage_table_shapes(sd: Mapping[str, torch.Tensor]) -> list[tuple[int, ...] | None]:
    key = "swinViT.layers{}.0.blocks.0.attn.relative_position_bias_table"
    return [tuple(sd[key.format(n)].shape) if key.format(n) in sd else None for n in range(1, 5)]


def _window(rows: int) -> str:
    side = round(rows ** (1 / 3))
    return str((side + 1) // 2) if side**3 == rows else f"? ({rows} relative positions)"


def _architecture_differences(sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list[str]:
    """Hyper-parameters behind the key and shape differences (base vs network)."""
    out = []
    if any(k.startswith("vit.") for k in sd):
        out.append("it is a UNETR (vit.* keys), not a SwinUNETR: use PEMMAUNETR")
    key = "swinViT.patch_embed.proj.weight"
    if key in sd and key in expected:
        b, n = tuple(sd[key].shape), tuple(expected[key].shape)
        if b[1] != n[1]:
            out.append(f"input channels {b[1]} vs {n[1]}: the base must be a single-channel CT SwinUNETR")
        if b[0] != n[0]:
            out.append(f"feature size {b[0]} vs {n[0]}")
        if b[2:] != n[2:]:
            out.append(f"patch size {_shape(b[2:])} vs {_shape(n[2:])}")
    depths_b, depths_n = _depths(list(sd)), _depths(list(expected))
    if any(depths_b) and depths_b != depths_n:
        out.append(f"depths {depths_b} vs {depths_n}")
    tables_b, tables_n = _stage_table_shapes(sd), _stage_table_shapes(expected)
    if all(tables_b) and all(tables_n):
        heads_b, heads_n = [t[1] for t in tables_b], [t[1] for t in tables_n]  # type: ignore[index]
        if heads_b != heads_n:
            out.append(f"num_heads {heads_b} vs {heads_n}")
        if tables_b[0][0] != tables_n[0][0]:  # type: ignore[index]
            out.append(f"window size {_window(tables_b[0][0])} vs {_window(tables_n[0][0])}")  # type: ignore[index]
    for flag, test in (
        ("use_v2", lambda k: k.startswith("swinViT.layers1c.")),
        ("qkv_bias", lambda k: k.endswith(".attn.qkv.bias")),
    ):
        b, n = any(map(test, sd)), any(map(test, expected))
        if any(k.startswith("swinViT.") for k in sd) and b != n:
            out.append(f"{flag} {b} vs {n}")
    key = "out.conv.conv.weight"
    if key in sd and key in expected and sd[key].shape[0] != expected[key].shape[0]:
        out.append(f"output channels {sd[key].shape[0]} vs {expected[key].shape[0]}")
    return out


def _base_mismatches(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list[str]:
    """What keeps ``state_dict`` from loading into the base modules whose state is ``expected``."""
    problems = []
    pemma = [k for k in state_dict if is_pemma_parameter(k)]
    if pemma:
        problems.append(f"it holds PEMMA parameters ({pemma[0]}, ...): load PEMMA checkpoints with load_state_dict")
    base = {k: v for k, v in state_dict.items() if not is_pemma_parameter(k)}
    problems.extend(_architecture_differences(base, expected))
    missing = [k for k in expected if k not in base]
    unexpected = [k for k in base if k not in expected]
    if missing:
        problems.append(f"{_count(len(missing), 'key')} missing, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{_count(len(unexpected), 'unexpected key')}, e.g. {unexpected[:3]}")
    differing = [
        (k, tuple(base[k].shape), tuple(v.shape)) for k, v in expected.items() if k in base and base[k].shape != v.shape
    ]
    if differing:
        examples = ", ".join(f"{k} {_shape(b)} vs {_shape(n)}" for k, b, n in differing[:3])
        problems.append(f"{_count(len(differing), 'tensor')} of different shape, e.g. {examples}")
    return problems

