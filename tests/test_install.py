"""What a fresh install must give: torchvision and timm import (nnU-Net imports them during every trainer lookup),
nnU-Net finds this repository's trainers through nnUNet_extTrainer, and `pemma --help` lists the subcommands."""

from __future__ import annotations

import subprocess
import sys

from conftest import run_ok

TRAINERS = ("UNETRTrainer", "PEMMATrainer", "PEMMAContinualTrainer", "PEMMADoRATrainer", "EarlyFusionTrainer",
            "EarlyFusionTrainer_zeroinit", "SwinUNETRTrainer", "PEMMASwinTrainer")


def test_nnunet_finds_the_trainers(nnunet_env: dict[str, str]) -> None:
    script = ("import timm, torchvision\n"
              "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
              f"for name in {TRAINERS!r}:\n"
              "    cls = find(name)\n"
              "    assert cls.__name__ == name, cls\n"
              "    print('found', name, cls.__module__)\n")
    proc = subprocess.run([sys.executable, "-c", script], env=nnunet_env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = [line.split() for line in proc.stdout.splitlines() if line.startswith("found ")]
    assert [f[1] for f in found] == list(TRAINERS) and {f[2] for f in found} == {"pemma_trainers"}, proc.stdout


def test_pemma_help_lists_the_subcommands(nnunet_env: dict[str, str]) -> None:
    out = run_ok(["pemma", "--help"], nnunet_env).stdout
    for command in ("demo", "reproduce", "phantom", "convert-hecktor", "plans", "predict", "predict-late-fusion",
                    "merge-adapter", "evaluate", "parameters"):
        assert command in out
