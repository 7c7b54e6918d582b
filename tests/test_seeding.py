"""Seeded trainings (PEMMA_SEED): two runs of the same nnUNetv2_train command give the same weights; another seed
gives others; a bad value is a one-line error."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import CONFIG, nnunet_environment, run_cli, run_ok
from nnunetv2_pemma.errors import PlansError
from nnunetv2_pemma.training.seeding import SEED_ENV, seed_from_environment
from nnunetv2_pemma.training.threads import CPU_THREADS_ENV

DATASET = "Dataset501_HNC_CT"


def _private_copy(workflow: dict, root: Path) -> dict[str, str]:
    """nnU-Net folders holding a copy of the shared workflow's preprocessed CT dataset (the workflow stays as it
    is: the trainings here write their own results)."""
    env = nnunet_environment(root)
    shutil.copytree(Path(workflow["env"]["nnUNet_preprocessed"]) / DATASET, Path(env["nnUNet_preprocessed"]) / DATASET)
    return env


def _train(env: dict[str, str], seed: str | None) -> dict:
    # one thread, as `pemma reproduce` trains on CPU: the setting whose determinism is documented
    env = {**env, CPU_THREADS_ENV: "1"}
    env = {**env, SEED_ENV: seed} if seed is not None else {k: v for k, v in env.items() if k != SEED_ENV}
    run_ok(["nnUNetv2_train", "501", CONFIG, "0", "-tr", "UNETRTrainer", "-device", "cpu"], env)
    path = (Path(env["nnUNet_results"]) / DATASET / f"UNETRTrainer__nnUNetPlans__{CONFIG}" / "fold_0"
            / "checkpoint_final.pth")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    shutil.rmtree(path.parent)
    return checkpoint


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> str:
    """Which tensors differ and by how much, for the failure message."""
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    largest = max(((a[k] - b[k]).abs().max().item() for k in differ), default=0.0)
    return f"{len(differ)} of {len(a)} tensors differ (largest difference {largest:.3g}), first: {differ[:3]}"


@pytest.mark.slow
def test_same_seed_same_checkpoint(workflow: dict, tmp_path: Path) -> None:
    env = _private_copy(workflow, tmp_path)
    first, second, other = _train(env, "7"), _train(env, "7"), _train(env, "8")
    assert first["logging"]["train_losses"] == second["logging"]["train_losses"]
    assert _same(first["network_weights"], second["network_weights"]), (
        "PEMMA_SEED=7 twice gave other weights: " + _differences(first["network_weights"], second["network_weights"]))
    exp_avg = [s["exp_avg"] for s in first["optimizer_state"]["state"].values()]
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(exp_avg, second["optimizer_state"]["state"].values()))
    assert not _same(first["network_weights"], other["network_weights"]), "another seed gave the same weights"


def test_seed_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SEED_ENV, raising=False)
    assert seed_from_environment() is None
    monkeypatch.setenv(SEED_ENV, " 12 ")
    assert seed_from_environment() == 12
    for bad in ("-1", "1.5", "abc"):
        monkeypatch.setenv(SEED_ENV, bad)
        with pytest.raises(PlansError, match=f"{SEED_ENV}='{bad}'"):
            seed_from_environment()


@pytest.mark.slow
def test_bad_seed_is_a_one_line_error(workflow: dict, tmp_path: Path) -> None:
    env = {**_private_copy(workflow, tmp_path), SEED_ENV: "x1"}
    proc = run_cli(["nnUNetv2_train", "501", CONFIG, "0", "-tr", "UNETRTrainer", "-device", "cpu"], env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (f"nnUNetv2_train: error: {SEED_ENV}='x1': expected a "
                                                     f"non-negative integer seed")
