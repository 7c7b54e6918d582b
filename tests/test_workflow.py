"""The README's workflow end to end through nnU-Net's own commands, on phantom data with the tiny preset:
CT base -> PEMMA adaptation (CT+PET, MDA) -> LoRA-only continual update (CT, HGJ) -> nnUNetv2_predict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import nnunet_environment, run_cli, run_ok

pytestmark = pytest.mark.slow

CONFIG = "3d_unetr_tiny"


def _checkpoint(env: dict[str, str], dataset: str, trainer: str) -> Path:
    return (Path(env["nnUNet_results"]) / dataset / f"{trainer}__nnUNetPlans__{CONFIG}" / "fold_0"
            / "checkpoint_final.pth")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["network_weights"]


@pytest.fixture(scope="module")
def workflow(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("workflow")
    env = nnunet_environment(root)
    data = root / "hecktor"
    run_ok(["pemma", "phantom", str(data), "--cases-per-center", "5", "--seed", "3"], env)

    run_ok(["pemma", "convert-hecktor", str(data), "--dataset-id", "501", "--name", "HNC_CT",
            "--centers", "CHUM", "CHUP", "CHUS", "CHUV", "--modalities", "CT"], env)
    run_ok(["nnUNetv2_plan_and_preprocess", "-d", "501", "-c", "3d_fullres", "--verify_dataset_integrity",
            "-np", "1"], env)
    run_ok(["pemma", "plans", "add", "501", "--preset", "tiny"], env)
    base_log = run_ok(["nnUNetv2_train", "501", CONFIG, "0", "-tr", "UNETRTrainer", "-device", "cpu"], env)
    base = _checkpoint(env, "Dataset501_HNC_CT", "UNETRTrainer")

    run_ok(["pemma", "convert-hecktor", str(data), "--dataset-id", "502", "--name", "HNC_CTPET_MDA",
            "--centers", "MDA", "--modalities", "CT", "PET"], env)
    run_ok(["pemma", "plans", "transfer", "501", "502", "--preset", "tiny"], env)
    run_ok(["nnUNetv2_train", "502", CONFIG, "0", "-tr", "PEMMATrainer", "-device", "cpu",
            "-pretrained_weights", str(base)], env)
    adapted = _checkpoint(env, "Dataset502_HNC_CTPET_MDA", "PEMMATrainer")

    run_ok(["pemma", "convert-hecktor", str(data), "--dataset-id", "503", "--name", "HNC_CT_HGJ",
            "--centers", "HGJ", "--modalities", "CT"], env)
    run_ok(["pemma", "plans", "transfer", "501", "503", "--preset", "tiny"], env)
    run_ok(["nnUNetv2_train", "503", CONFIG, "0", "-tr", "PEMMAContinualTrainer", "-device", "cpu",
            "-pretrained_weights", str(adapted)], env)
    continual = _checkpoint(env, "Dataset503_HNC_CT_HGJ", "PEMMAContinualTrainer")
    return {"env": env, "root": root, "base": base, "adapted": adapted, "continual": continual,
            "base_log": base_log.stdout}


def test_training_uses_centre_stratified_splits(workflow: dict) -> None:
    env = workflow["env"]
    raw = Path(env["nnUNet_raw"]) / "Dataset501_HNC_CT"
    splits = json.loads((Path(env["nnUNet_preprocessed"]) / "Dataset501_HNC_CT" / "splits_final.json").read_text())
    assert splits == json.loads((raw / "pemma_splits.json").read_text())
    centres = json.loads((raw / "dataset.json").read_text())["pemma"]["centers"]
    for fold in splits:
        assert {centres[c] for c in fold["val"]} == {"CHUM", "CHUP", "CHUS", "CHUV"}
    validated = sorted(p.name[:-len(".nii.gz")] for p in (workflow["base"].parent / "validation").glob("*.nii.gz"))
    assert validated == sorted(splits[0]["val"])


def test_adaptation_keeps_base_weights_bit_identical(workflow: dict) -> None:
    base, adapted = _weights(workflow["base"]), _weights(workflow["adapted"])
    for key, value in base.items():
        assert torch.equal(value, adapted[key]), f"base weight {key} changed during PEMMA adaptation"
    new = set(adapted) - set(base)
    assert new and all("lora" in k or k.startswith("pet_") for k in new), sorted(new)
    lora_b = [k for k in new if "lora_B" in k]
    assert any(adapted[k].abs().sum() > 0 for k in lora_b), "LoRA B matrices did not train"


def test_continual_update_changes_only_lora(workflow: dict) -> None:
    adapted, continual = _weights(workflow["adapted"]), _weights(workflow["continual"])
    assert adapted.keys() == continual.keys()
    changed = {k for k in adapted if not torch.equal(adapted[k], continual[k])}
    assert changed, "the continual update changed nothing"
    assert all("lora" in k for k in changed), sorted(k for k in changed if "lora" not in k)


def test_nnunet_predict_on_ct_pet(workflow: dict, tmp_path: Path) -> None:
    env = workflow["env"]
    images = Path(env["nnUNet_raw"]) / "Dataset502_HNC_CTPET_MDA" / "imagesTr"
    inputs = tmp_path / "in"
    inputs.mkdir()
    case = sorted(images.glob("*_0000.nii.gz"))[0].name[:-len("_0000.nii.gz")]
    for f in images.glob(f"{case}_000*.nii.gz"):
        (inputs / f.name).symlink_to(f)
    out = tmp_path / "out"
    run_ok(["nnUNetv2_predict", "-i", str(inputs), "-o", str(out), "-d", "502", "-c", CONFIG, "-tr", "PEMMATrainer",
            "-f", "0", "-device", "cpu", "--disable_tta"], env)
    pred = sitk.ReadImage(str(out / f"{case}.nii.gz"))
    ct = sitk.ReadImage(str(images / f"{case}_0000.nii.gz"))
    assert pred.GetSize() == ct.GetSize() and np.allclose(pred.GetOrigin(), ct.GetOrigin())
    assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2}


def test_pemma_trainer_refuses_a_checkpoint_with_adapters(workflow: dict) -> None:
    proc = run_cli(["nnUNetv2_train", "502", CONFIG, "1", "-tr", "PEMMATrainer", "-device", "cpu",
                    "-pretrained_weights", str(workflow["adapted"])], workflow["env"])
    assert proc.returncode != 0
    assert "already holds PEMMA adapters" in proc.stderr and str(workflow["adapted"]) in proc.stderr


def test_continual_trainer_refuses_a_plain_ct_checkpoint(workflow: dict) -> None:
    proc = run_cli(["nnUNetv2_train", "503", CONFIG, "1", "-tr", "PEMMAContinualTrainer", "-device", "cpu",
                    "-pretrained_weights", str(workflow["base"])], workflow["env"])
    assert proc.returncode != 0
    assert "no PEMMA adapters" in proc.stderr


def test_pemma_trainer_without_pretrained_weights_fails_clearly(workflow: dict) -> None:
    proc = run_cli(["nnUNetv2_train", "502", CONFIG, "2", "-tr", "PEMMATrainer", "-device", "cpu"],
                   workflow["env"])
    assert proc.returncode != 0
    assert "pass -pretrained_weights" in proc.stderr


def test_incompatible_base_checkpoint_names_what_differs(workflow: dict, tmp_path: Path) -> None:
    checkpoint = torch.load(workflow["base"], map_location="cpu", weights_only=False)
    configuration = checkpoint["init_args"]["plans"]["configurations"][CONFIG]
    configuration["patch_size"] = [48, 48, 48]
    configuration["pemma"]["model"]["hidden_size"] = 96
    wrong = tmp_path / "wrong.pth"
    torch.save(checkpoint, wrong)
    proc = run_cli(["nnUNetv2_train", "502", CONFIG, "3", "-tr", "PEMMATrainer", "-device", "cpu",
                    "-pretrained_weights", str(wrong)], workflow["env"])
    assert proc.returncode != 0
    assert "patch size [48, 48, 48] (checkpoint) vs [32, 32, 32]" in proc.stderr
    assert "hidden_size 96 (checkpoint) vs 48" in proc.stderr
