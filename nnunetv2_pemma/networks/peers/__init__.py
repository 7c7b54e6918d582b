"""Peer PET/CT segmentation networks, written from their papers, run in the same harness as PEMMA."""
