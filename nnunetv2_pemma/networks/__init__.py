"""Networks: the plain MONAI backbones (``backbones/``), their PEMMA forms with modality slots (``pemma_unetr``,
``pemma_swin`` over ``modality_slots``), the early-fusion baseline, and building any of them from the plans."""
