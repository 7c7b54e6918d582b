"""What nnU-Net trainers of this package share: reading the plans' "pemma" block, optimiser and schedule,
network builders and checkpoint checks. Independent of how nnU-Net finds trainer classes."""
