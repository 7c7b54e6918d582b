"""Extending a built network in place: a mixin class put in front of the module's own class.

nnU-Net builds its U-Nets from the plans; the PEMMA and modality-channel forms of such a network are that very
object with a behaviour added, so its modules, parameters and state-dict names stay nnU-Net's (a checkpoint of the
plain network loads as it is) and nnU-Net's own methods (deep supervision switch, forward) keep working.
"""

from __future__ import annotations

from torch import nn

_EXTENDED: dict[tuple[type, type], type] = {}


def extend_class(module: nn.Module, behaviour: type) -> None:
    """Put `behaviour` (a mixin) in front of `module`'s own class, in place: its state and names stay."""
    key = (behaviour, type(module))
    if key not in _EXTENDED:
        _EXTENDED[key] = type(f"{behaviour.__name__}{type(module).__name__}", (behaviour, type(module)), {})
    module.__class__ = _EXTENDED[key]
