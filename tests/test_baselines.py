"""Baselines through nnU-Net's commands on the session's phantom workflow: early fusion (from the CT base, then
a CT-only update with the PET channel zero) and late fusion (CT model + PET-only model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import CONFIG, IN_PROCESS_PREDICTION, checkpoint_of, run_cli, run_ok, weights, workspace_copy

pytestmark = pytest.mark.slow

PATCH_EMBEDDING = "vit.patch_embedding.patch_embeddings.weight"


@pytest.fixture(scope="module")
def early_fusion(workflow: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    env = workspace_copy(workflow, tmp_path_factory.mktemp("early_fusion") / "workspace")["env"]
    run_ok(["nnUNetv2_train", "502", CONFIG, "0", "-tr", "EarlyFusionTrainer_zeroinit", "-device", "cpu",
            "-pretrained_weights", str(workflow["base"])], env)
    adapted = checkpoint_of(env, "Dataset502_HNC_CTPET_MDA", "EarlyFusionTrainer_zeroinit")
    run_ok(["nnUNetv2_train", "503", CONFIG, "0", "-tr", "EarlyFusionTrainer", "-device", "cpu",
            "-pretrained_weights", str(adapted)], env)
    return {"adapted": adapted, "updated": checkpoint_of(env, "Dataset503_HNC_CT_HGJ", "EarlyFusionTrainer"),
            "env": env}


def test_early_fusion_widens_and_trains_the_whole_model(workflow: dict, early_fusion: dict) -> None:
    base, fused = weights(workflow["base"]), weights(early_fusion["adapted"])
    assert base.keys() == fused.keys()
    assert base[PATCH_EMBEDDING].shape[1] == 1 and fused[PATCH_EMBEDDING].shape[1] == 2
    used = [k for k in base if base[k].shape == fused[k].shape and base[k].is_floating_point()
            and "norm_cross_attn" not in k]  # MONAI creates that norm but never uses it without cross-attention
    unchanged = [k for k in used if torch.equal(base[k], fused[k])]
    assert not unchanged, f"early fusion should fine-tune the whole model; unchanged: {unchanged}"


def test_early_fusion_ct_only_update_changes_shared_weights(early_fusion: dict) -> None:
    """The forgetting mechanism PEMMA avoids: a CT-only update rewrites weights the PET pathway depends on."""
    before, after = weights(early_fusion["adapted"]), weights(early_fusion["updated"])
    assert before.keys() == after.keys()
    assert not torch.equal(before["vit.blocks.0.attn.qkv.weight"], after["vit.blocks.0.attn.qkv.weight"])


def test_early_fusion_refuses_a_pemma_checkpoint(workflow: dict) -> None:
    proc = run_cli(["nnUNetv2_train", "502", CONFIG, "1", "-tr", "EarlyFusionTrainer", "-device", "cpu",
                    "-pretrained_weights", str(workflow["adapted"])], workflow["env"])
    assert proc.returncode != 0 and "already holds PEMMA adapters" in proc.stderr


@pytest.mark.parametrize("modalities", [["CT", "PET"], ["PET"]])
def test_early_fusion_predicts_from_any_subset(early_fusion: dict, tmp_path: Path, modalities: list[str]) -> None:
    env = early_fusion["env"]
    images = Path(env["nnUNet_raw"]) / "Dataset502_HNC_CTPET_MDA" / "imagesTr"
    case = sorted(images.glob("*_0000.nii.gz"))[0].name[:-len("_0000.nii.gz")]
    (tmp_path / "in").mkdir()
    for i, m in enumerate(modalities):
        (tmp_path / "in" / f"{case}_{i:04d}.nii.gz").symlink_to(images / f"{case}_{['CT', 'PET'].index(m):04d}.nii.gz")
    run_ok(["pemma", "predict", "-np", "0", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-d", "502", "-c", CONFIG,
            "-tr", "EarlyFusionTrainer_zeroinit", "-f", "0", "-device", "cpu", "--disable_tta", "--modalities",
            *modalities], env)
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / f"{case}.nii.gz")))
    assert set(np.unique(pred)) <= {0, 1, 2}


def test_late_fusion_averages_a_ct_and_a_pet_model(own_workflow: dict, tmp_path: Path) -> None:
    env = own_workflow["env"]
    data = own_workflow["root"] / "hecktor"
    run_ok(["pemma", "convert-hecktor", str(data), "--dataset-id", "505", "--name", "HNC_PET_MDA",
            "--centers", "MDA", "--modalities", "PET"], env)
    run_ok(["pemma", "plans", "transfer", "501", "505", "--preset", "tiny"], env)
    run_ok(["nnUNetv2_train", "505", CONFIG, "0", "-tr", "UNETRTrainer", "-device", "cpu"], env)

    images = Path(env["nnUNet_raw"]) / "Dataset502_HNC_CTPET_MDA" / "imagesTr"
    case = sorted(images.glob("*_0000.nii.gz"))[0].name[:-len("_0000.nii.gz")]
    (tmp_path / "in").mkdir()
    for f in images.glob(f"{case}_000*.nii.gz"):
        (tmp_path / "in" / f.name).symlink_to(f)
    outputs = {}
    for w in ("1.0", "0.0", "0.5"):
        out = tmp_path / f"out_{w}"
        run_ok(["pemma", "predict-late-fusion", "-i", str(tmp_path / "in"), "-o", str(out), "--modalities", "CT",
                "PET", "--ct-model", "501", "UNETRTrainer", CONFIG, "--pet-model", "505", "UNETRTrainer", CONFIG,
                "--w-ct", w, "-device", "cpu", "--disable_tta"], env)
        outputs[w] = sitk.ReadImage(str(out / f"{case}.nii.gz"))
    # each model alone through nnU-Net, with its probabilities, and nnU-Net's equal-weight ensemble of the two
    alone = {}
    for model, channel in (("501", 0), ("505", 1)):
        (tmp_path / f"in_{model}").mkdir()
        (tmp_path / f"in_{model}" / f"{case}_0000.nii.gz").symlink_to(images / f"{case}_{channel:04d}.nii.gz")
        run_ok(["nnUNetv2_predict", "-i", str(tmp_path / f"in_{model}"), "-o", str(tmp_path / f"alone_{model}"),
                "-d", model, "-c", CONFIG, "-tr", "UNETRTrainer", "-f", "0", "-device", "cpu", "--disable_tta",
                "--save_probabilities", *IN_PROCESS_PREDICTION], env)
        alone[model] = sitk.ReadImage(str(tmp_path / f"alone_{model}" / f"{case}.nii.gz"))
    run_ok(["nnUNetv2_ensemble", "-i", str(tmp_path / "alone_501"), str(tmp_path / "alone_505"), "-o",
            str(tmp_path / "ensemble"), "-np", "1"], env)
    ensemble = sitk.ReadImage(str(tmp_path / "ensemble" / f"{case}.nii.gz"))
    # w_C = 1: the CT model's segmentation; w_C = 0: the PET model's; w_C = 0.5: nnU-Net's ensemble
    for w, reference in (("1.0", alone["501"]), ("0.0", alone["505"]), ("0.5", ensemble)):
        assert np.array_equal(sitk.GetArrayFromImage(outputs[w]), sitk.GetArrayFromImage(reference)), w
        assert np.allclose(outputs[w].GetOrigin(), reference.GetOrigin())
        assert np.allclose(outputs[w].GetSpacing(), reference.GetSpacing())
    assert set(np.unique(sitk.GetArrayFromImage(outputs["0.5"]))) <= {0, 1, 2}


def test_dora_adaptation_and_continual_update(workflow: dict, own_workflow: dict) -> None:
    env = own_workflow["env"]
    run_ok(["nnUNetv2_train", "502", CONFIG, "0", "-tr", "PEMMADoRATrainer", "-device", "cpu",
            "-pretrained_weights", str(workflow["base"])], env)
    adapted = checkpoint_of(env, "Dataset502_HNC_CTPET_MDA", "PEMMADoRATrainer")
    run_ok(["nnUNetv2_train", "503", CONFIG, "0", "-tr", "PEMMADoRAContinualTrainer", "-device", "cpu",
            "-pretrained_weights", str(adapted)], env)
    updated = checkpoint_of(env, "Dataset503_HNC_CT_HGJ", "PEMMADoRAContinualTrainer")
    base, dora, continual = weights(workflow["base"]), weights(adapted), weights(updated)
    assert any("lora_magnitude" in k for k in dora)
    assert all(torch.equal(base[k], dora[k]) for k in base)
    changed = {k for k in dora if not torch.equal(dora[k], continual[k])}
    assert changed and all("lora" in k for k in changed)
    proc = run_cli(["nnUNetv2_train", "503", CONFIG, "1", "-tr", "PEMMADoRAContinualTrainer", "-device", "cpu",
                    "-pretrained_weights", str(workflow["adapted"])], env)
    assert proc.returncode != 0 and "adapter method lora (checkpoint) vs dora" in proc.stderr


def test_swin_workflow_runs_unchanged(own_workflow: dict, tmp_path: Path) -> None:
    """CT SwinUNETR -> PEMMA adaptation (CT+PET) -> CT-only continual update -> P inference."""
    env, swin = own_workflow["env"], "3d_swinunetr_tiny"
    run_ok(["pemma", "plans", "add", "501", "--preset", "swin_tiny"], env)
    run_ok(["nnUNetv2_train", "501", swin, "0", "-tr", "SwinUNETRTrainer", "-device", "cpu"], env)
    results = Path(env["nnUNet_results"])
    base = results / "Dataset501_HNC_CT" / f"SwinUNETRTrainer__nnUNetPlans__{swin}" / "fold_0" / "checkpoint_final.pth"
    for target in ("502", "503"):
        run_ok(["pemma", "plans", "transfer", "501", target, "--preset", "swin_tiny"], env)
    run_ok(["nnUNetv2_train", "502", swin, "0", "-tr", "PEMMASwinTrainer", "-device", "cpu",
            "-pretrained_weights", str(base)], env)
    adapted = (results / "Dataset502_HNC_CTPET_MDA" / f"PEMMASwinTrainer__nnUNetPlans__{swin}" / "fold_0"
               / "checkpoint_final.pth")
    run_ok(["nnUNetv2_train", "503", swin, "0", "-tr", "PEMMASwinContinualTrainer", "-device", "cpu",
            "-pretrained_weights", str(adapted)], env)
    base_w, adapted_w = weights(base), weights(adapted)
    assert all(torch.equal(base_w[k], adapted_w[k]) for k in base_w)
    assert {k for k in adapted_w if k not in base_w} and all(
        k.startswith("pet_") or "lora" in k for k in adapted_w if k not in base_w)

    images = Path(env["nnUNet_raw"]) / "Dataset502_HNC_CTPET_MDA" / "imagesTr"
    case = sorted(images.glob("*_0000.nii.gz"))[0].name[:-len("_0000.nii.gz")]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / f"{case}_0000.nii.gz").symlink_to(images / f"{case}_0001.nii.gz")
    run_ok(["pemma", "predict", "-np", "0", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-d", "503", "-c", swin,
            "-tr", "PEMMASwinContinualTrainer", "-f", "0", "-device", "cpu", "--modalities", "PET"], env)
    assert (tmp_path / "out" / f"{case}.nii.gz").is_file()
    proc = run_cli(["nnUNetv2_train", "501", CONFIG, "1", "-tr", "SwinUNETRTrainer", "-device", "cpu"], env)
    assert proc.returncode != 0 and "SwinUNETRTrainer trains a SwinUNETR" in proc.stderr
