"""Inference on nnU-Net's predictor: `predictor` (a model fed any subset of its modalities), `modalities` (the plans
such a subset needs) and `late_fusion` (a CT model and a PET model, their probabilities averaged)."""
