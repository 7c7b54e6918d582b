"""Presets (`<name>.json`), installed as ``nnunetv2_pemma.presets``: `pemma plans add DATASET --preset NAME`."""
