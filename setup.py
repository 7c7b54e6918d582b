"""Packages: the library, plus the repository's top-level `trainers/` and `plans/` folders installed inside it
(as ``nnunetv2_pemma.trainers`` and ``nnunetv2_pemma.presets``), so a wheel or `pip install .` carries both.
Metadata lives in setup.cfg."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["nnunetv2_pemma", "nnunetv2_pemma.*"])
    + ["nnunetv2_pemma.trainers"]
    + [f"nnunetv2_pemma.trainers.{p}" for p in find_packages(where="trainers")]
    + ["nnunetv2_pemma.presets"],
    package_dir={"nnunetv2_pemma.trainers": "trainers", "nnunetv2_pemma.presets": "plans"},
    # presets; the seed spreads the claims are decided with (nnunetv2_pemma/experiments/seed_spread.json)
    package_data={"nnunetv2_pemma.presets": ["*.json"], "nnunetv2_pemma.experiments": ["*.json"]},
)
