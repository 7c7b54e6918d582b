"""Shared test helpers: nnU-Net folders in a temporary place and real command-line calls."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "trainers"))


def nnunet_environment(root: Path) -> dict[str, str]:
    """Environment for nnU-Net commands: private raw/preprocessed/results folders, our trainers, and the
    settings that keep nnU-Net quick on 2 CPU cores (one export worker, in-process augmentation)."""
    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / name).mkdir(parents=True, exist_ok=True)
        env[name] = str(root / name)
    env.update(nnUNet_extTrainer=str(REPO / "trainers"), nnUNet_def_n_proc="1", nnUNet_n_proc_DA="0",
               nnUNet_compile="false", PYTHONUNBUFFERED="1")
    return env


def run_cli(args: list[str], env: dict[str, str], timeout: float = 1200) -> subprocess.CompletedProcess:
    """Run a console command of this venv (pemma, nnUNetv2_*) and capture its output."""
    if args[0] == "nnUNetv2_plan_and_preprocess":
        # the planner calls torch.set_num_threads(nnUNet_n_proc_DA), which rejects 0
        env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}
    exe = BIN / args[0]
    cmd = [str(exe), *args[1:]] if exe.exists() else args
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def run_ok(args: list[str], env: dict[str, str], timeout: float = 1200) -> subprocess.CompletedProcess:
    proc = run_cli(args, env, timeout)
    assert proc.returncode == 0, (f"{' '.join(args)} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-5000:]}"
                                  f"\n--- stderr ---\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture
def nnunet_env(tmp_path: Path) -> dict[str, str]:
    return nnunet_environment(tmp_path)
