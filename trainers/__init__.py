"""nnU-Net trainers of nnunetv2-pemma, installed as ``nnunetv2_pemma.trainers``.

nnU-Net finds them through ``nnUNet_extTrainer`` (``pemma env`` prints the export). One small subclass per
behaviour, in folders named by what they change, as nnU-Net's ``training/nnUNetTrainer/variants``:

- ``network_architecture/``: networks trained from scratch: the transformers (UNETR, SwinUNETR) and the peers
  (nnU-Net's U-Net under a preset's budget, H2ASeg, the 2.5D slice-interaction network and its fine-tuning);
- ``adaptation/``: PEMMA's adaptation and continual updates (LoRA, DoRA);
- ``baselines/``: early fusion;
- ``prognosis/``: a survival head trained with segmentation, adapted CT -> CT+PET -> CT+PET+clinical;
- ``variants/``: PET initialisation and modality dropout of the above;
- ``benchmarking/``: trainers that time training steps (``benchmarks/speed_memory.py``).
"""
