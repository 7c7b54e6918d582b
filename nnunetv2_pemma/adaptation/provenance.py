"""Which CT base an adapter belongs to: a fingerprint of the base tensors, recorded when the adapter is trained.

An adapter only makes sense on the exact base it was trained on; another checkpoint of the same architecture (even
the same run's checkpoint_best.pth) loads without complaint and silently gives a different model. The fingerprint
is a SHA-256 over the names, dtypes, shapes and bytes of every tensor that is not an adapter's own
(`methods.is_added`), so it is the same whether computed on the CT base checkpoint or on the base part of an
adapted network, on CPU or GPU.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import torch

from nnunetv2_pemma.adaptation.methods import is_added

PEMMA_BASE_KEY = "pemma_base"  # checkpoint["init_args"][PEMMA_BASE_KEY]: {FINGERPRINT_KEY: ..., BASE_FILE_KEY: ...}
FINGERPRINT_KEY = "base_fingerprint"  # in that record and in adapter metadata
BASE_FILE_KEY = "base_file"


def base_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of the base tensors of a state dict (adapter tensors are left out)."""
    digest = hashlib.sha256()
    for name in sorted(k for k in state_dict if not is_added(k)):
        tensor = state_dict[name].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(state_dict[name].shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
