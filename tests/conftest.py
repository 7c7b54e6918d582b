"""Shared test helpers: nnU-Net folders in a temporary place and real command-line calls."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nnunetv2_pemma.environment import trainer_folder

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def nnunet_environment(root: Path) -> dict[str, str]:
    """Environment for nnU-Net commands: private raw/preprocessed/results folders, our trainers, and the
    settings that keep nnU-Net quick on 2 CPU cores (one export worker, in-process augmentation)."""
    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / name).mkdir(parents=True, exist_ok=True)
        env[name] = str(root / name)
    env.update(nnUNet_extTrainer=str(trainer_folder()), nnUNet_def_n_proc="1", nnUNet_n_proc_DA="0",
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


def first_case_inputs(images: Path, modalities: list[str], folder: Path) -> str:
    """The first case of a raw images folder (channels CT = 0, PET = 1) as a prediction input folder holding
    `modalities`, renumbered from _0000; returns the case id."""
    case = sorted(images.glob("*_0000.nii.gz"))[0].name[:-len("_0000.nii.gz")]
    folder.mkdir(parents=True)
    for i, m in enumerate(modalities):
        (folder / f"{case}_{i:04d}.nii.gz").symlink_to(images / f"{case}_{['CT', 'PET'].index(m):04d}.nii.gz")
    return case


def train_step(net: torch.nn.Module, x: torch.Tensor, classes: int = 3) -> None:
    """One AdamW step over the trainable parameters on random labels: enough to see which weights move."""
    net.train()
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    target = torch.randint(0, classes, (x.shape[0], *x.shape[2:]))
    torch.nn.functional.cross_entropy(net(x), target).backward()
    optimizer.step()


def changed_keys(before: dict[str, torch.Tensor], net: torch.nn.Module) -> set[str]:
    return {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Reproducible unit tests that leave torch's thread count as they found it."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def nnunet_env(tmp_path: Path) -> dict[str, str]:
    return nnunet_environment(tmp_path)


CONFIG = "3d_unetr_tiny"


def checkpoint_of(env: dict[str, str], dataset: str, trainer: str) -> Path:
    return (Path(env["nnUNet_results"]) / dataset / f"{trainer}__nnUNetPlans__{CONFIG}" / "fold_0"
            / "checkpoint_final.pth")


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["network_weights"]


@pytest.fixture(scope="session")
def workflow(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The README workflow through nnU-Net's commands on phantom data (tiny preset), run once per session:
    CT base (501) -> PEMMA adaptation on MDA CT+PET (502) -> LoRA-only continual update on HGJ CT (503)."""
    root = tmp_path_factory.mktemp("workflow")
    env = nnunet_environment(root)
    data = root / "hecktor"
    run_ok(["pemma", "phantom", str(data), "--cases-per-center", "5", "--labelled-test-cases-per-center", "2",
            "--seed", "3"], env)

    run_ok(["pemma", "convert-hecktor", str(data), "--dataset-id", "501", "--name", "HNC_CT",
            "--centers", "CHUM", "CHUP", "CHUS", "CHUV", "--modalities", "CT"], env)
    run_ok(["nnUNetv2_plan_and_preprocess", "-d", "501", "-c", "3d_fullres", "--verify_dataset_integrity",
            "-np", "1"], env)
    run_ok(["pemma", "plans", "add", "501", "--preset", "tiny"], env)
    base_log = run_ok(["nnUNetv2_train", "501", CONFIG, "0", "-tr", "UNETRTrainer", "-device", "cpu"], env)
    base = checkpoint_of(env, "Dataset501_HNC_CT", "UNETRTrainer")

    run_ok(["pemma", "convert-hecktor", str(data), "--dataset-id", "502", "--name", "HNC_CTPET_MDA",
            "--centers", "MDA", "--modalities", "CT", "PET"], env)
    run_ok(["pemma", "plans", "transfer", "501", "502", "--preset", "tiny"], env)
    run_ok(["nnUNetv2_train", "502", CONFIG, "0", "-tr", "PEMMATrainer", "-device", "cpu",
            "-pretrained_weights", str(base)], env)
    adapted = checkpoint_of(env, "Dataset502_HNC_CTPET_MDA", "PEMMATrainer")

    run_ok(["pemma", "convert-hecktor", str(data), "--dataset-id", "503", "--name", "HNC_CT_HGJ",
            "--centers", "HGJ", "--modalities", "CT"], env)
    run_ok(["pemma", "plans", "transfer", "501", "503", "--preset", "tiny"], env)
    run_ok(["nnUNetv2_train", "503", CONFIG, "0", "-tr", "PEMMAContinualTrainer", "-device", "cpu",
            "-pretrained_weights", str(adapted)], env)
    continual = checkpoint_of(env, "Dataset503_HNC_CT_HGJ", "PEMMAContinualTrainer")
    return {"env": env, "root": root, "base": base, "adapted": adapted, "continual": continual,
            "base_log": base_log.stdout}


CNN_CONFIG = "3d_fullres_unet_tiny"
CTPET_MDA, CT_HGJ = "Dataset502_HNC_CTPET_MDA", "Dataset503_HNC_CT_HGJ"


def cnn_checkpoint(env: dict[str, str], dataset: str, trainer: str) -> Path:
    return Path(env["nnUNet_results"]) / dataset / f"{trainer}__nnUNetPlans__{CNN_CONFIG}" / "fold_0" / \
        "checkpoint_final.pth"


@pytest.fixture(scope="session")
def cnn_models(workflow: dict) -> dict:
    """The CNN forms on the workflow's datasets (unet_tiny preset): a CT base of nnU-Net's U-Net
    (nnUNetPresetTrainer on 501's CT) -> PEMMACNNTrainer on MDA CT+PET (502) -> PEMMACNNContinualTrainer on HGJ CT
    (503); nnUNetChannelDropoutTrainer from scratch and EarlyFusionCNNTrainer from the base on 502. Used by the
    CNN tests and the peer table's rows."""
    env = workflow["env"]
    run_ok(["pemma", "plans", "add", "501", "--preset", "unet_tiny"], env)
    run_ok(["nnUNetv2_train", "501", CNN_CONFIG, "0", "-tr", "nnUNetPresetTrainer", "-device", "cpu"], env)
    base = cnn_checkpoint(env, "Dataset501_HNC_CT", "nnUNetPresetTrainer")
    for target in ("502", "503"):
        run_ok(["pemma", "plans", "transfer", "501", target, "--preset", "unet_tiny"], env)
    run_ok(["nnUNetv2_train", "502", CNN_CONFIG, "0", "-tr", "PEMMACNNTrainer", "-device", "cpu",
            "-pretrained_weights", str(base)], env)
    adapted = cnn_checkpoint(env, CTPET_MDA, "PEMMACNNTrainer")
    run_ok(["nnUNetv2_train", "503", CNN_CONFIG, "0", "-tr", "PEMMACNNContinualTrainer", "-device", "cpu",
            "-pretrained_weights", str(adapted)], env)
    run_ok(["nnUNetv2_train", "502", CNN_CONFIG, "0", "-tr", "nnUNetChannelDropoutTrainer", "-device", "cpu"], env)
    run_ok(["nnUNetv2_train", "502", CNN_CONFIG, "0", "-tr", "EarlyFusionCNNTrainer", "-device", "cpu",
            "-pretrained_weights", str(base)], env)
    return {"env": env, "base": base, "adapted": adapted, "unetr_base": workflow["base"],
            "continual": cnn_checkpoint(env, CT_HGJ, "PEMMACNNContinualTrainer"),
            "dropout": cnn_checkpoint(env, CTPET_MDA, "nnUNetChannelDropoutTrainer"),
            "fusion": cnn_checkpoint(env, CTPET_MDA, "EarlyFusionCNNTrainer")}


def assert_conversion_interrupted(proc, stderr, why: str, raw: Path) -> None:
    """A `pemma convert-hecktor` stopped by a signal: exit code 2, one line saying so on stderr (the open file the
    process wrote), no traceback, nothing left in nnUNet_raw."""
    assert proc.wait(timeout=120) == 2
    stderr.seek(0)
    err = stderr.read()
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"pemma convert-hecktor: error: interrupted ({why}); the unfinished "
                                            f"dataset and its lock were removed")
    assert list(raw.iterdir()) == []
