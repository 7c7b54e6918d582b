"""nnU-Net's predictor for a 2.5D model: its 2-D sliding window hands the network one slice at a time
(data[:, z, y0:y1, x0:x1]), so every slice's neighbours are stacked into the channels first, the way
the trainer's datasets stacked them in training (`NeighbourDatasets`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunetv2_pemma.training.slice_stacking import check_slices, stack_neighbours


class SliceStackPredictor(nnUNetPredictor):
    """nnUNetPredictor (same keyword arguments) plus `slices`, the k neighbouring slices the model sees."""

    def __init__(self, *, slices: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.slices = check_slices(slices)

    def predict_sliding_window_return_logits(self, input_image: torch.Tensor) -> np.ndarray | torch.Tensor:
        """input_image: (C, Z, Y, X) -> logits (classes, Z, Y, X); the network gets (1, C * slices, y, x) tiles."""
        return super().predict_sliding_window_return_logits(stack_neighbours(input_image, self.slices))
