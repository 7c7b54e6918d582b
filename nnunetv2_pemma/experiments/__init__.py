"""The PEMMA paper's experiments, as `pemma reproduce` and `pemma demo` run them: the protocol's job graph of
nnU-Net commands, its scheduler, the scoring of every trained model with CT+PET, CT and PET input, and Table 2
with the paper's claims checked on it. Metrics and parameter counts live in `nnunetv2_pemma.evaluation`."""
