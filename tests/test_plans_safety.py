"""`pemma plans add/transfer` never replace plans silently, name nnU-Net's commands as nnU-Net takes them, and warn
about a PET window that cannot carry any signal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import nnunet_environment, run_cli, run_ok

pytestmark = pytest.mark.slow


def _error_line(proc, command: str) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"pemma {command}: error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_plans_add_on_an_unplanned_dataset_names_the_dataset_id(tmp_path: Path) -> None:
    env = nnunet_environment(tmp_path)
    run_ok(["pemma", "phantom", str(tmp_path / "hecktor"), "--cases-per-center", "1"], env)
    run_ok(["pemma", "convert-hecktor", str(tmp_path / "hecktor"), "--dataset-id", "603", "--name", "Unplanned",
            "--centers", "CHUM", "--modalities", "CT"], env)
    (Path(env["nnUNet_preprocessed"]) / "Dataset603_Unplanned").mkdir()
    line = _error_line(run_cli(["pemma", "plans", "add", "603", "--preset", "tiny"], env), "plans")
    assert "run `nnUNetv2_plan_and_preprocess -d 603 -c 3d_fullres` first" in line


def test_plans_add_keeps_a_differing_configuration_unless_overwrite(own_workflow: dict, tmp_path: Path) -> None:
    env = own_workflow["env"]
    folder = Path(env["nnUNet_preprocessed"]) / "Dataset501_HNC_CT"
    shutil.copy(folder / "nnUNetPlans.json", folder / "nnUNetPlansCopy.json")
    run_ok(["pemma", "plans", "add", "501", "--preset", "tiny", "--plans", "nnUNetPlansCopy"], env)  # same again
    preset = json.loads((Path(__file__).parents[1] / "plans" / "tiny.json").read_text())
    preset["model"]["hidden_size"] = 96
    other = tmp_path / "tiny_wider.json"
    other.write_text(json.dumps(preset))
    before = (folder / "nnUNetPlansCopy.json").read_bytes()
    line = _error_line(run_cli(["pemma", "plans", "add", "501", "--preset", str(other), "--plans",
                                "nnUNetPlansCopy"], env), "plans")
    assert f"already has a configuration '{preset['configuration']}' that differs in" in line and "pemma" in line
    assert (folder / "nnUNetPlansCopy.json").read_bytes() == before
    run_ok(["pemma", "plans", "add", "501", "--preset", str(other), "--plans", "nnUNetPlansCopy", "--overwrite"], env)
    plans = json.loads((folder / "nnUNetPlansCopy.json").read_text())
    assert plans["configurations"][preset["configuration"]]["pemma"]["model"]["hidden_size"] == 96


def test_plans_transfer_from_another_source_needs_overwrite(workflow: dict) -> None:
    env = workflow["env"]
    plans_file = Path(env["nnUNet_preprocessed"]) / "Dataset502_HNC_CTPET_MDA" / "nnUNetPlans.json"
    before = plans_file.read_bytes()
    line = _error_line(run_cli(["pemma", "plans", "transfer", "503", "502", "--preset", "tiny"], env), "plans")
    assert f"{plans_file} was transferred from Dataset501_HNC_CT, not Dataset503_HNC_CT_HGJ" in line
    assert plans_file.read_bytes() == before


def test_all_zero_pets_warn_of_a_degenerate_pet_window(tmp_path: Path) -> None:
    env = nnunet_environment(tmp_path)
    run_ok(["pemma", "phantom", str(tmp_path / "hecktor"), "--cases-per-center", "2"], env)
    run_ok(["pemma", "convert-hecktor", str(tmp_path / "hecktor"), "--dataset-id", "604", "--name", "NoPET",
            "--centers", "MDA", "--modalities", "CT", "PET"], env)
    for pet in (Path(env["nnUNet_raw"]) / "Dataset604_NoPET" / "imagesTr").glob("*_0001.nii.gz"):
        image = sitk.ReadImage(str(pet))
        zero = sitk.GetImageFromArray(np.zeros_like(sitk.GetArrayFromImage(image)))
        zero.CopyInformation(image)
        sitk.WriteImage(zero, str(pet), useCompression=True)
    run_ok(["nnUNetv2_plan_and_preprocess", "-d", "604", "-c", "3d_fullres", "-np", "1", "-npfp", "1"], env)
    proc = run_ok(["pemma", "plans", "add", "604", "--preset", "tiny"], env)
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("pemma plans: warning: ")]
    assert warnings == ["pemma plans: warning: Dataset604_NoPET: degenerate PET window [0, 0] SUV with std 0 under "
                        "the labels (are its PET images all zero?); PET will carry no signal"]


def test_a_narrowed_unet_follows_its_parents_inherited_architecture(own_workflow: dict, tmp_path: Path) -> None:
    """unet_tiny's width on a parent configuration that inherits its U-Net from 3d_fullres (nnU-Net's plans
    inheritance, resolved by nnU-Net's PlansManager): the planned stages at base 24, max 192 features."""
    env = own_workflow["env"]
    plans_file = Path(env["nnUNet_preprocessed"]) / "Dataset501_HNC_CT" / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["3d_child"] = {"inherits_from": "3d_fullres"}
    plans_file.write_text(json.dumps(plans))
    preset = json.loads((Path(__file__).parents[1] / "plans" / "unet_tiny.json").read_text())
    preset.update(inherits_from="3d_child", configuration="3d_child_unet_tiny")
    (tmp_path / "child.json").write_text(json.dumps(preset))
    run_ok(["pemma", "plans", "add", "501", "--preset", str(tmp_path / "child.json")], env)
    planned = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    written = json.loads(plans_file.read_text())["configurations"]["3d_child_unet_tiny"]["architecture"]["arch_kwargs"]
    assert written["features_per_stage"] == [min(24 * 2**k, 192) for k in range(planned["n_stages"])]
    assert {k: v for k, v in written.items() if k != "features_per_stage"} == \
        {k: v for k, v in planned.items() if k != "features_per_stage"}
