"""nnU-Net's predictor on CPU, about twice as fast for small 3-D patches.

nnU-Net's sliding window runs the network on one patch at a time. For a batch of one, PyTorch's CPU convolution
picks its native `slow_conv3d` whenever N*C*D*H is at most 20480 (a 32^3 patch with 8 to 16 channels: the demo's
networks) and oneDNN from a batch of two on; `benchmarks/cpu_inference.py` measures the difference. So on CPU each
patch goes through the network as a batch of two copies and the first result is kept. The logits equal the
batch-of-one path's within float rounding (1e-5); on a GPU nothing changes.
"""

from __future__ import annotations

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor


class PairedPatchesOnCPU:
    """Mixin for nnUNetPredictor: on CPU a single patch is predicted as a batch of two identical patches."""

    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.shape[0] == 1:
            return super()._internal_maybe_mirror_and_predict(torch.cat([x, x]))[:1]
        return super()._internal_maybe_mirror_and_predict(x)


class CPUFriendlyPredictor(PairedPatchesOnCPU, nnUNetPredictor):
    """nnUNetPredictor (same arguments) with paired patches on CPU."""
