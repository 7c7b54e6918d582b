"""The README's workflow end to end through nnU-Net's own commands, on phantom data with the tiny preset:
CT base -> PEMMA adaptation (CT+PET, MDA) -> LoRA-only continual update (CT, HGJ) -> nnUNetv2_predict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import run_cli, run_ok
from test_trainer_errors import one_line_error

pytestmark = pytest.mark.slow

from conftest import CONFIG, weights as _weights


def test_training_uses_centre_stratified_splits(workflow: dict) -> None:
    env = workflow["env"]
    raw = Path(env["nnUNet_raw"]) / "Dataset501_HNC_CT"
    splits = json.loads((Path(env["nnUNet_preprocessed"]) / "Dataset501_HNC_CT" / "splits_final.json").read_text())
    assert splits == json.loads((raw / "splits_final.json").read_text())
    centres = json.loads((raw / "dataset.json").read_text())["pemma"]["centers"]
    for fold in splits:
        assert {centres[c] for c in fold["val"]} == {"CHUM", "CHUP", "CHUS", "CHUV"}
    validated = sorted(p.name[:-len(".nii.gz")] for p in (workflow["base"].parent / "validation").glob("*.nii.gz"))
    assert validated == sorted(splits[0]["val"])


def test_labelled_test_cases_are_in_no_split_and_not_preprocessed(workflow: dict) -> None:
    env = workflow["env"]
    for dataset, centres in (("Dataset501_HNC_CT", ("CHUM", "CHUP", "CHUS", "CHUV")),
                             ("Dataset502_HNC_CTPET_MDA", ("MDA",)), ("Dataset503_HNC_CT_HGJ", ("HGJ",))):
        raw, preprocessed = Path(env["nnUNet_raw"]) / dataset, Path(env["nnUNet_preprocessed"]) / dataset
        test = {p.name[:-len(".nii.gz")] for p in (raw / "labelsTs").glob("*.nii.gz")}
        assert test == {f"{c}-{i}" for c in centres for i in (401, 402)}, dataset
        assert {p.name[:-len("_0000.nii.gz")] for p in (raw / "imagesTs").glob("*_0000.nii.gz")} == test
        for fold in json.loads((preprocessed / "splits_final.json").read_text()):
            assert not test & set(fold["train"] + fold["val"]), dataset
        stored = {p.name.split(".")[0] for p in preprocessed.rglob("*") if p.is_file()}
        assert not test & stored, f"{dataset}: test cases were preprocessed"
        assert json.loads((raw / "dataset.json").read_text())["numTraining"] == 5 * len(centres)


def test_plans_name_the_network_the_trainers_build(workflow: dict) -> None:
    """The PEMMA configuration's nnU-Net architecture entry is MONAI's UNETR with the preset's arguments, not the
    PlainConvUNet it would otherwise inherit from 3d_fullres."""
    for dataset in ("Dataset501_HNC_CT", "Dataset502_HNC_CTPET_MDA"):
        plans = json.loads((Path(workflow["env"]["nnUNet_preprocessed"]) / dataset / "nnUNetPlans.json").read_text())
        entry = plans["configurations"][CONFIG]["architecture"]
        model = {k: v for k, v in plans["configurations"][CONFIG]["pemma"]["model"].items() if k != "architecture"}
        assert entry == {"network_class_name": "monai.networks.nets.UNETR", "arch_kwargs": model,
                         "_kw_requires_import": []}
        assert plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"].endswith("PlainConvUNet")


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
    message = one_line_error(proc)
    assert "already holds PEMMA adapters" in message and str(workflow["adapted"]) in message


def test_continual_trainer_refuses_a_plain_ct_checkpoint(workflow: dict) -> None:
    proc = run_cli(["nnUNetv2_train", "503", CONFIG, "1", "-tr", "PEMMAContinualTrainer", "-device", "cpu",
                    "-pretrained_weights", str(workflow["base"])], workflow["env"])
    assert "no PEMMA adapters" in one_line_error(proc)


def test_pemma_trainer_without_pretrained_weights_fails_clearly(workflow: dict) -> None:
    proc = run_cli(["nnUNetv2_train", "502", CONFIG, "2", "-tr", "PEMMATrainer", "-device", "cpu"],
                   workflow["env"])
    assert "pass -pretrained_weights" in one_line_error(proc)


def test_incompatible_base_checkpoint_names_what_differs(workflow: dict, tmp_path: Path) -> None:
    checkpoint = torch.load(workflow["base"], map_location="cpu", weights_only=False)
    configuration = checkpoint["init_args"]["plans"]["configurations"][CONFIG]
    configuration["patch_size"] = [48, 48, 48]
    configuration["pemma"]["model"]["hidden_size"] = 96
    wrong = tmp_path / "wrong.pth"
    torch.save(checkpoint, wrong)
    proc = run_cli(["nnUNetv2_train", "502", CONFIG, "3", "-tr", "PEMMATrainer", "-device", "cpu",
                    "-pretrained_weights", str(wrong)], workflow["env"])
    message = one_line_error(proc)
    assert "patch size [48, 48, 48] (checkpoint) vs [32, 32, 32]" in message
    assert "hidden_size 96 (checkpoint) vs 48" in message


def _base_record(checkpoint: Path) -> dict:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["init_args"]["pemma_base"]


def _adapter_metadata(checkpoint: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(checkpoint.parent / "adapter_final.safetensors"), framework="pt") as f:
        return f.metadata()


def test_adapted_and_continual_models_record_their_ct_base(workflow: dict, tmp_path: Path) -> None:
    """PEMMA's checkpoint and adapter, and those of the continual update that started from it, name the CT base
    the adapters were trained on, so that the continual adapter applies to that base."""
    from nnunetv2_pemma.adaptation.provenance import base_fingerprint

    base = {"base_fingerprint": base_fingerprint(_weights(workflow["base"])),
            "base_file": str(workflow["base"].resolve())}
    for model in ("adapted", "continual"):
        assert _base_record(workflow[model]) == base, model
        metadata = _adapter_metadata(workflow[model])
        assert {k: metadata.get(k) for k in base} == base, model
    run_ok(["pemma", "apply-adapter", "--base", str(workflow["base"]), "--adapter",
            str(workflow["continual"].parent / "adapter_final.safetensors"), "--out", str(tmp_path / "merged")],
           workflow["env"])
    merged = _weights(tmp_path / "merged" / "fold_0" / "checkpoint_final.pth")
    continual = _weights(workflow["continual"])
    assert merged.keys() == continual.keys() and all(torch.equal(merged[k], continual[k]) for k in continual)


def test_continual_trainer_refuses_a_checkpoint_whose_base_changed(workflow: dict, tmp_path: Path) -> None:
    checkpoint = torch.load(workflow["adapted"], map_location="cpu", weights_only=False)
    key = "vit.blocks.0.attn.out_proj.weight"
    before = checkpoint["network_weights"][key].clone()
    checkpoint["network_weights"][key][0, 0] += 1e-6
    assert not torch.equal(before, checkpoint["network_weights"][key])
    changed = tmp_path / "changed.pth"
    torch.save(checkpoint, changed)
    proc = run_cli(["nnUNetv2_train", "503", CONFIG, "3", "-tr", "PEMMAContinualTrainer", "-device", "cpu",
                    "-pretrained_weights", str(changed)], workflow["env"])
    message = one_line_error(proc)
    assert message.startswith(f"{changed}: its base tensors differ from the CT base it was adapted from "
                              f"({workflow['base'].resolve()}, fingerprint ")


def test_continual_update_of_a_checkpoint_without_record_records_its_own_base(own_workflow: dict,
                                                                              tmp_path: Path) -> None:
    """A PEMMA checkpoint of release 0.2 records no CT base: the continual update records the checkpoint's own
    base tensors, and the checkpoint itself as their file."""
    from nnunetv2_pemma.adaptation.provenance import base_fingerprint

    checkpoint = torch.load(own_workflow["adapted"], map_location="cpu", weights_only=False)
    del checkpoint["init_args"]["pemma_base"]
    old = tmp_path / "release_0.2.pth"
    torch.save(checkpoint, old)
    run_ok(["nnUNetv2_train", "503", CONFIG, "2", "-tr", "PEMMAContinualTrainer", "-device", "cpu",
            "-pretrained_weights", str(old)], own_workflow["env"])
    updated = own_workflow["continual"].parent.parent / "fold_2" / "checkpoint_final.pth"
    assert _base_record(updated) == {"base_fingerprint": base_fingerprint(_weights(own_workflow["base"])),
                                     "base_file": str(old.resolve())}


def test_resumed_and_validated_runs_keep_the_base_record(own_workflow: dict) -> None:
    """The record lives in nnU-Net's init_args, which `--c` restores from the checkpoint and saves again, also in
    the adapter; `--val` loads it too."""
    env = own_workflow["env"]
    fold5 = own_workflow["adapted"].parent.parent / "fold_5"
    fold5.mkdir()
    checkpoint = torch.load(own_workflow["adapted"], map_location="cpu", weights_only=False)
    checkpoint["current_epoch"] = 2  # the last epoch is done: on_train_end writes the final checkpoint at once
    torch.save(checkpoint, fold5 / "checkpoint_latest.pth")
    run_ok(["nnUNetv2_train", "502", CONFIG, "5", "-tr", "PEMMATrainer", "-device", "cpu", "--c"], env)
    assert _base_record(fold5 / "checkpoint_final.pth") == _base_record(own_workflow["adapted"])
    assert _adapter_metadata(fold5 / "checkpoint_final.pth")["base_file"] == \
        _base_record(own_workflow["adapted"])["base_file"]  # the shared workflow's base, which the copy came from
    # with one export worker the validation ran in threads (worker_pools); nnU-Net's spawned processes write the same
    threads = {p.name: p.read_bytes() for p in (fold5 / "validation").glob("*.nii.gz")}
    summary = json.loads((fold5 / "validation" / "summary.json").read_text())
    run_ok(["nnUNetv2_train", "502", CONFIG, "5", "-tr", "PEMMATrainer", "-device", "cpu", "--val"],
           {**env, "nnUNet_def_n_proc": "2"})
    assert threads and threads == {p.name: p.read_bytes() for p in (fold5 / "validation").glob("*.nii.gz")}
    assert json.loads((fold5 / "validation" / "summary.json").read_text()) == summary


def _inputs(raw_images: Path, case: str, channels: list[int], folder: Path) -> Path:
    """nnU-Net input folder for one case holding the given raw channels, renumbered from _0000."""
    folder.mkdir(parents=True)
    for i, c in enumerate(channels):
        (folder / f"{case}_{i:04d}.nii.gz").symlink_to(raw_images / f"{case}_{c:04d}.nii.gz")
    return folder


@pytest.mark.parametrize("modalities,channels", [(["CT", "PET"], [0, 1]), (["CT"], [0]), (["PET"], [1])])
def test_pemma_predict_any_modality_subset(workflow: dict, tmp_path: Path, modalities: list[str],
                                           channels: list[int]) -> None:
    """C, P and CP inference from one model, also from the continual model, whose last data had CT alone."""
    env = workflow["env"]
    images = Path(env["nnUNet_raw"]) / "Dataset502_HNC_CTPET_MDA" / "imagesTr"
    case = sorted(images.glob("*_0000.nii.gz"))[0].name[:-len("_0000.nii.gz")]
    inputs = _inputs(images, case, channels, tmp_path / "in")
    for dataset, trainer in (("502", "PEMMATrainer"), ("503", "PEMMAContinualTrainer")):
        out = tmp_path / f"out_{dataset}"
        run_ok(["pemma", "predict", "-np", "0", "-i", str(inputs), "-o", str(out), "-d", dataset, "-c", CONFIG,
                "-tr", trainer, "-f", "0", "-device", "cpu", "--disable_tta", "--modalities", *modalities], env)
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz")))
        ct = sitk.GetArrayFromImage(sitk.ReadImage(str(images / f"{case}_0000.nii.gz")))
        assert pred.shape == ct.shape and set(np.unique(pred)) <= {0, 1, 2}


def test_pemma_predict_rejects_unknown_modality_for_ct_model(workflow: dict, tmp_path: Path) -> None:
    env = workflow["env"]
    images = Path(env["nnUNet_raw"]) / "Dataset502_HNC_CTPET_MDA" / "imagesTr"
    case = sorted(images.glob("*_0000.nii.gz"))[0].name[:-len("_0000.nii.gz")]
    inputs = _inputs(images, case, [1], tmp_path / "in")
    proc = run_cli(["pemma", "predict", "-np", "0", "-i", str(inputs), "-o", str(tmp_path / "out"), "-d", "501",
                    "-c", CONFIG, "-tr", "UNETRTrainer", "-f", "0", "-device", "cpu", "--modalities", "PET"], env)
    assert proc.returncode == 2
    assert "this model knows ['CT']" in proc.stderr


def test_apply_adapter_rebuilds_the_adapted_checkpoint(workflow: dict, tmp_path: Path) -> None:
    adapter = workflow["adapted"].parent / "adapter_final.safetensors"
    assert adapter.stat().st_size < workflow["adapted"].stat().st_size / 2
    run_ok(["pemma", "apply-adapter", "--base", str(workflow["base"]), "--adapter", str(adapter),
            "--out", str(tmp_path / "merged")], workflow["env"])
    merged = _weights(tmp_path / "merged" / "fold_0" / "checkpoint_final.pth")
    adapted = _weights(workflow["adapted"])
    assert merged.keys() == adapted.keys()
    assert all(torch.equal(merged[k], adapted[k]) for k in adapted)


def test_apply_adapter_refuses_an_adapted_checkpoint_as_base(workflow: dict, tmp_path: Path) -> None:
    adapter = workflow["adapted"].parent / "adapter_final.safetensors"
    proc = run_cli(["pemma", "apply-adapter", "--base", str(workflow["adapted"]), "--adapter", str(adapter),
                    "--out", str(tmp_path / "merged")], workflow["env"])
    assert proc.returncode == 2 and "expected a CT base checkpoint" in proc.stderr
    assert not (tmp_path / "merged").exists()


def test_apply_adapter_that_does_not_fit_leaves_nothing(workflow: dict, tmp_path: Path) -> None:
    """An adapter whose tensors do not fit the network its plans describe fails in the staged folder, with the
    keys that differ named, and neither the output folder nor the staging folder is left behind."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(workflow["adapted"].parent / "adapter_final.safetensors"), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    key = next(k for k in tensors if "lora_A_q" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=metadata)
    out = tmp_path / "out" / "merged"
    proc = run_cli(["pemma", "apply-adapter", "--base", str(workflow["base"]), "--adapter", str(bad),
                    "--out", str(out)], workflow["env"])
    assert proc.returncode == 2 and "do not make the adapted network" in proc.stderr and key in proc.stderr
    ours = [line for line in proc.stderr.splitlines() if "do not make the adapted network" in line]
    assert len(ours) == 1 and ours[0].startswith("pemma apply-adapter: error: ") and key in ours[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_predict_restores_the_original_ct_grid(own_workflow: dict, tmp_path: Path) -> None:
    """Cases cropped by convert-hecktor come back into the original CT grid with --crop-records."""
    env = own_workflow["env"]
    run_ok(["pemma", "convert-hecktor", str(own_workflow["root"] / "hecktor"), "--dataset-id", "504", "--name",
            "HNC_MDA_CROPPED", "--centers", "MDA", "--modalities", "CT", "PET", "--crop-size-mm", "40", "40", "40"],
           env)
    raw = Path(env["nnUNet_raw"]) / "Dataset504_HNC_MDA_CROPPED"
    case = sorted((raw / "imagesTr").glob("*_0000.nii.gz"))[0].name[:-len("_0000.nii.gz")]
    inputs = _inputs(raw / "imagesTr", case, [0, 1], tmp_path / "in")
    out = tmp_path / "out"
    run_ok(["pemma", "predict", "-i", str(inputs), "-o", str(out), "-d", "502", "-c", CONFIG, "-tr", "PEMMATrainer",
            "-f", "0", "-device", "cpu", "--disable_tta", "--crop-records", str(raw)], env)
    original = sitk.ReadImage(str(own_workflow["root"] / "hecktor" / "imagesTr" / f"{case}__CT.nii.gz"))
    cropped = sitk.ReadImage(str(raw / "imagesTr" / f"{case}_0000.nii.gz"))
    restored = sitk.ReadImage(str(out / f"{case}.nii.gz"))
    assert cropped.GetSize() != original.GetSize()
    assert restored.GetSize() == original.GetSize()
    assert np.allclose(restored.GetOrigin(), original.GetOrigin())
    assert np.allclose(restored.GetSpacing(), original.GetSpacing())


def test_resume_keeps_frozen_weights_frozen(own_workflow: dict) -> None:
    """`--c` from a mid-training checkpoint rebuilds the adapted network and its frozen base."""
    env = own_workflow["env"]
    fold4 = own_workflow["adapted"].parent.parent / "fold_4"
    fold4.mkdir()
    checkpoint = torch.load(own_workflow["adapted"], map_location="cpu", weights_only=False)
    checkpoint["current_epoch"] = 1
    torch.save(checkpoint, fold4 / "checkpoint_latest.pth")
    run_ok(["nnUNetv2_train", "502", CONFIG, "4", "-tr", "PEMMATrainer", "-device", "cpu", "--c"], env)
    resumed, base = _weights(fold4 / "checkpoint_final.pth"), _weights(own_workflow["base"])
    assert all(torch.equal(base[k], resumed[k]) for k in base)
    adapted = _weights(own_workflow["adapted"])
    assert any(not torch.equal(adapted[k], resumed[k]) for k in resumed if "lora" in k), "resumed run did not train"
