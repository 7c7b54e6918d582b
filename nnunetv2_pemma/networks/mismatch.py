"""Why a state dict is not the base a PEMMA network can adapt: the message `load_base_state_dict` raises."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from nnunetv2_pemma.adaptation.methods import is_added
from nnunetv2_pemma.errors import CheckpointError


class IncompatibleBaseError(CheckpointError, ValueError):
    """A state dict is not a base this PEMMA network can adapt; the message names what differs."""


def count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def shape(t: Sequence[int]) -> str:
    return "x".join(str(s) for s in t)


Explain = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], list[str]]


def base_mismatches(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                    explain: Explain) -> list[str]:
    """What keeps `state_dict` from loading into the base modules whose state is `expected`.

    `explain(base, expected)` is the architecture's reading of the differences (hidden size, patch size, ...).
    """
    problems = []
    added = [k for k in state_dict if is_added(k)]
    if added:
        problems.append(f"it holds adapter parameters ({added[0]}, ...): load adapted checkpoints with "
                        f"load_state_dict")
    base = {k: v for k, v in state_dict.items() if not is_added(k)}
    problems.extend(dict.fromkeys(explain(base, expected)))  # unique, in order
    missing = [k for k in expected if k not in base]
    unexpected = [k for k in base if k not in expected]
    if missing:
        problems.append(f"{count(len(missing), 'key')} missing, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{count(len(unexpected), 'unexpected key')}, e.g. {unexpected[:3]}")
    differing = [(k, tuple(base[k].shape), tuple(v.shape)) for k, v in expected.items()
                 if k in base and base[k].shape != v.shape]
    if differing:
        examples = ", ".join(f"{k} {shape(b)} vs {shape(n)}" for k, b, n in differing[:3])
        problems.append(f"{count(len(differing), 'tensor')} of different shape, e.g. {examples}")
    return problems
