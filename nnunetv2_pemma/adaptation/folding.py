"""Fold LoRA / DoRA into the fused ``qkv`` weights, conv LoRA into its convolution's kernel and norm shifts into
their norm's scale and bias, for inference.

After :func:`fold_adapters` every attention layer is a plain ``nn.Linear`` again, and every wrapped convolution a
plain convolution: the low-rank branches cost nothing
at inference, and the network computes what it did before (within float rounding). (Putting an adapter file onto
a base checkpoint is another thing: :func:`nnunetv2_pemma.adaptation.files.apply_adapter`.)
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn as nn

from nnunetv2_pemma.adaptation.conv_layers import LoRAConv2d, LoRAConv3d, RoutedLoRAConv2d, RoutedLoRAConv3d
from nnunetv2_pemma.adaptation.layers import LoRAQKVLinear
from nnunetv2_pemma.adaptation.norm_layers import ShiftedInstanceNorm2d, ShiftedInstanceNorm3d

FOLDED_BY_PLAIN = (LoRAConv2d, LoRAConv3d, ShiftedInstanceNorm2d, ShiftedInstanceNorm3d)
"""Adapter layers that fold themselves (``plain()``) into the layer class they wrap."""
ROUTED = (RoutedLoRAConv2d, RoutedLoRAConv3d)
"""Conv LoRA with a CT-only pair: folds for one input pattern (``plain(holds_pet)``)."""
FOLDED_FOR_PET = "folded_for_pet"
"""Attribute a network folded with CT-only pairs gets: the input pattern it now computes (True: with PET)."""

__all__ = ["fold_adapters"]

M = TypeVar("M", bound=nn.Module)


@torch.no_grad()
def fold_adapters(net: M, holds_pet: bool | None = None) -> M:
    """Replace every :class:`LoRAQKVLinear` (LoRA or DoRA) in ``net`` by a plain ``nn.Linear`` whose weight
    is the layer's ``merged_weight()`` (a disabled adapter merges to the base weight), and every conv LoRA layer and
    norm shift by its plain layer (``plain()``).

    A network whose conv LoRA has CT-only pairs (``adaptation.ct_only_adapters``) computes two functions; it folds
    into one of them: ``holds_pet`` True for CT+PET or PET input, False for CT alone. The folded network records
    which (``folded_for_pet``), and its PEMMA forward refuses the other input pattern.

    The base parameters keep their state-dict names (``...attn.qkv.weight``, ``...attn.qkv.bias``); the
    ``lora_*`` tensors are gone, so the merged network no longer loads adapter files or trains its adapters:
    merge a copy (``copy.deepcopy``) when the original is still needed. ``requires_grad`` of the base weight and
    bias is kept.

    Returns:
        ``net`` itself (modified in place), for chaining.
    """
    plain: dict[int, nn.Module] = {}  # one plain layer per adapter, wherever it is registered (nnU-Net: twice)
    layers = [(n, m) for n, m in net.named_modules(remove_duplicate=False) if isinstance(m, FOLDED_BY_PLAIN + ROUTED)]
    routed = any(isinstance(m, ROUTED) for _, m in layers)
    if routed and holds_pet is None:
        raise TypeError("this network has CT-only adapter pairs: fold it for one input pattern with holds_pet "
                        "(True: CT+PET or PET input, False: CT alone)")
    for name, layer in layers:
        if not name:
            raise TypeError(f"cannot merge a {type(layer).__name__} in place of itself: use its plain()")
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, child, plain.setdefault(id(layer), layer.plain(holds_pet) if isinstance(layer, ROUTED)
                                                else layer.plain()))
    if routed:
        setattr(net, FOLDED_FOR_PET, holds_pet)
    targets = [(name, m) for name, m in net.named_modules() if isinstance(m, LoRAQKVLinear)]
    if any(not name for name, _ in targets):
        raise TypeError("cannot merge a LoRA layer in place of itself: use nn.Linear with its merged_weight()")
    for name, layer in targets:
        weight = layer.merged_weight().detach().to(dtype=layer.weight.dtype)
        merged = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        merged.weight = nn.Parameter(weight.clone(), requires_grad=layer.weight.requires_grad)
        if layer.bias is not None:
            merged.bias = layer.bias  # unchanged by LoRA / DoRA (DoRA rescales the weight only)
        merged.train(layer.training)
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, child, merged)
    return net
