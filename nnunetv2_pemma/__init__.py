"""nnunetv2-pemma: parameter-efficient multi-modal (CT -> CT+PET) adaptation for nnU-Net v2."""

__version__ = "0.1.0"
