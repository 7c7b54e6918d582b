"""Trainers that benchmarks/speed_memory.py times: the measured trainers, fed random batches instead of data."""
