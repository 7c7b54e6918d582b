"""The CPU predictor's batched patches: the same logits as nnU-Net's own predictor (within its half-precision
accumulation), mirroring included, for patch counts that fill batches and ones that leave a batch of one."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNETR
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_pemma.inference.cpu_patches import PATCHES_PER_BATCH, CPUFriendlyPredictor

LABELS = {"background": 0, "GTVp": 1, "GTVn": 2}
PATCH = (16, 16, 16)


class _Recorded(UNETR):
    """MONAI's UNETR, recording the batch sizes it is called with."""

    def __init__(self) -> None:
        super().__init__(2, 3, PATCH, feature_size=4, hidden_size=32, mlp_dim=64, num_heads=2)
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        return super().forward(x)


def _predictor(cls: type, net: torch.nn.Module, mirroring: bool) -> nnUNetPredictor:
    plans = PlansManager({"configurations": {"3d": {"patch_size": list(PATCH), "architecture": {
        "network_class_name": "monai.networks.nets.UNETR", "arch_kwargs": {}, "_kw_requires_import": []}}},
        "label_manager": "LabelManager"})
    predictor = cls(use_mirroring=mirroring, perform_everything_on_device=False, device=torch.device("cpu"),
                    allow_tqdm=False)
    predictor.manual_initialization(net, plans, plans.get_configuration("3d"), None, {"labels": LABELS},
                                    "nnUNetTrainer", (0, 1, 2) if mirroring else None)
    return predictor


@pytest.mark.parametrize("shape, mirroring", [((2, 24, 24, 24), False), ((2, 16, 16, 48), True),
                                              ((2, 16, 16, 16), False)])
def test_batched_patches_match_nnunets_predictor(shape: tuple[int, ...], mirroring: bool) -> None:
    torch.manual_seed(0)
    net = _Recorded().eval()
    image = torch.randn(shape)
    expected = _predictor(nnUNetPredictor, net, mirroring).predict_sliding_window_return_logits(image)
    patches = len(net.batches) // (8 if mirroring else 1)
    net.batches.clear()
    logits = _predictor(CPUFriendlyPredictor, net, mirroring).predict_sliding_window_return_logits(image)
    torch.testing.assert_close(logits.float(), expected.float(), atol=2e-2, rtol=2e-3)
    assert torch.equal(logits.argmax(0), expected.argmax(0))
    full, rest = divmod(patches, PATCHES_PER_BATCH)
    batches = [PATCHES_PER_BATCH] * full + ([max(rest, 2)] if rest else [])  # never a batch of one
    assert net.batches == [b for b in batches for _ in range(8 if mirroring else 1)], (patches, net.batches)
