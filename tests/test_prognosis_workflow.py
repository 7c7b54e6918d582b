"""The README's prognosis commands end to end on phantom data: convert-hecktor --with-outcomes, nnU-Net's planning,
the five prognosis trainers through nnUNetv2_train, pemma predict-risk and pemma evaluate-survival."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from lifelines.utils import concordance_index

from conftest import nnunet_environment, run_cli, run_ok, weights

pytestmark = pytest.mark.slow

CONFIG = "3d_unetr_prognosis"
CT, CTPET = "Dataset611_ProgCT", "Dataset612_ProgCTPET"


def _checkpoint(env: dict[str, str], dataset: str, trainer: str) -> Path:
    return (Path(env["nnUNet_results"]) / dataset / f"{trainer}__nnUNetPlans__{CONFIG}" / "fold_0"
            / "checkpoint_final.pth")


@pytest.fixture(scope="module")
def prognosis(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """CT base -> PEMMA CT+PET -> PEMMA CT+PET+clinical, and early fusion CT+PET -> +clinical (4 iterations each)."""
    root = tmp_path_factory.mktemp("prognosis")
    env = nnunet_environment(root)
    preset = json.loads((Path(__file__).parents[1] / "plans" / "prognosis.json").read_text())
    preset["batch_size"] = 2
    preset["schedule"].update(num_iterations=4, num_iterations_per_epoch=2, num_val_iterations_per_epoch=1)
    preset_file = root / "prognosis_test.json"
    preset_file.write_text(json.dumps(preset))
    data = root / "hecktor"
    run_ok(["pemma", "phantom", str(data), "--cases-per-center", "2", "--seed", "5"], env)
    run_ok(["pemma", "convert-hecktor", str(data), "--dataset-id", "611", "--name", "ProgCT", "--modalities", "CT",
            "--with-outcomes"], env)
    run_ok(["pemma", "convert-hecktor", str(data), "--dataset-id", "612", "--name", "ProgCTPET", "--with-outcomes"],
           env)
    run_ok(["nnUNetv2_plan_and_preprocess", "-d", "611", "-c", "3d_fullres", "-np", "1", "-npfp", "1"], env)
    run_ok(["pemma", "plans", "add", "611", "--preset", str(preset_file)], env)
    run_ok(["pemma", "plans", "transfer", "611", "612", "--preset", str(preset_file)], env)

    def train(dataset_id: str, trainer: str, pretrained: Path | None = None) -> Path:
        extra = ["-pretrained_weights", str(pretrained)] if pretrained else []
        run_ok(["nnUNetv2_train", dataset_id, CONFIG, "0", "-tr", trainer, "-device", "cpu", *extra], env)
        return _checkpoint(env, CT if dataset_id == "611" else CTPET, trainer)

    base = train("611", "SurvivalUNETRTrainer")
    cp = train("612", "PEMMASurvivalTrainer", base)
    cpt = train("612", "PEMMAClinicalTrainer", cp)
    ef_cp = train("612", "EarlyFusionSurvivalTrainer", base)
    ef_cpt = train("612", "EarlyFusionClinicalTrainer", ef_cp)
    return {"env": env, "root": root, "data": data, "base": base, "cp": cp, "cpt": cpt, "ef_cp": ef_cp,
            "ef_cpt": ef_cpt}


def test_clinical_stage_leaves_the_base_and_the_ct_pet_weights_bit_identical(prognosis):
    base, cp, cpt = (weights(prognosis[k]) for k in ("base", "cp", "cpt"))
    assert any(k.startswith("prognosis.") for k in base)
    for key, tensor in cp.items():
        if "lora_" not in key:  # the base (its survival head included) and the PET branch
            assert torch.equal(cpt[key], tensor), key
    for key, tensor in base.items():
        assert torch.equal(cp[key], tensor), key
    new = {k for k in cpt if k not in cp}
    assert new and all(k.startswith("ehr_token.") for k in new)
    moved = {k for k in cp if not torch.equal(cp[k], cpt[k])}
    assert moved and all("lora_" in k for k in moved)  # the qkv adapters train in the clinical stage too


def test_early_fusion_head_reads_the_clinical_vector_and_everything_trains(prognosis):
    ef_cp, ef_cpt = weights(prognosis["ef_cp"]), weights(prognosis["ef_cpt"])
    assert ef_cp["prognosis.linear.weight"].shape[1] + 18 == ef_cpt["prognosis.linear.weight"].shape[1]
    assert not torch.equal(ef_cp["vit.blocks.0.mlp.linear1.weight"], ef_cpt["vit.blocks.0.mlp.linear1.weight"])


def test_predict_risk_and_evaluate_survival(prognosis, tmp_path):
    env, raw = prognosis["env"], Path(prognosis["env"]["nnUNet_raw"]) / CTPET
    risks = tmp_path / "risks.csv"
    out = run_ok(["pemma", "predict-risk", "-i", str(raw / "imagesTr"), "-o", str(risks), "-d", "612", "-c", CONFIG,
                  "-tr", "PEMMAClinicalTrainer", "-device", "cpu"], env).stdout
    frame = pd.read_csv(risks)
    assert f"risks of {len(frame)} cases (CT+PET)" in out
    assert len(frame) == 14 and frame["clinical"].eq(1).all() and frame["risk"].notna().all()
    run_ok(["pemma", "evaluate-survival", str(risks), "--outcomes", str(raw), "--out", str(tmp_path / "ev"),
            "--bootstrap", "200"], env)
    report = json.loads((tmp_path / "ev" / "survival.json").read_text())
    outcomes = json.loads((raw / "outcomes.json").read_text())["cases"]
    time = [outcomes[c]["rfs_days"] for c in frame["case"]]
    event = [outcomes[c]["relapse"] for c in frame["case"]]
    assert report["c_index"] == pytest.approx(concordance_index(time, -frame["risk"], event))
    assert (tmp_path / "ev" / "kaplan_meier.png").stat().st_size > 0
    # the CT+PET model also scores CT alone (the absent PET is a zero image, as for segmentation)
    ct_only = tmp_path / "ct_only"
    ct_only.mkdir()
    for f in sorted((raw / "imagesTr").glob("*_0000.nii.gz")):
        (ct_only / f.name).symlink_to(f)
    run_ok(["pemma", "predict-risk", "-i", str(ct_only), "-o", str(tmp_path / "c.csv"), "-d", "612", "-c", CONFIG,
            "-tr", "PEMMASurvivalTrainer", "-device", "cpu", "--modalities", "CT"], env)
    assert pd.read_csv(tmp_path / "c.csv")["modalities"].eq("CT").all()


def test_prognosis_misuse_is_one_line(prognosis, tmp_path):
    env, raw = prognosis["env"], Path(prognosis["env"]["nnUNet_raw"]) / CTPET
    # a segmentation-only checkpoint cannot start prognosis
    segmentation_only = tmp_path / "seg_only.pth"
    checkpoint = torch.load(prognosis["base"], map_location="cpu", weights_only=False)
    checkpoint["network_weights"] = {k: v for k, v in checkpoint["network_weights"].items()
                                     if not k.startswith("prognosis.")}
    torch.save(checkpoint, segmentation_only)
    proc = run_cli(["nnUNetv2_train", "612", CONFIG, "1", "-tr", "PEMMASurvivalTrainer", "-device", "cpu",
                    "-pretrained_weights", str(segmentation_only)], env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"nnUNetv2_train: error: {segmentation_only} has no survival head (prognosis.*): prognosis starts from a "
        f"SurvivalUNETRTrainer checkpoint (the CT base trained with segmentation and survival) and continues from "
        f"the previous prognosis stage")
    # early fusion's clinical stage continues from an early-fusion prognosis model, not from the CT base
    proc = run_cli(["nnUNetv2_train", "612", CONFIG, "1", "-tr", "EarlyFusionClinicalTrainer", "-device", "cpu",
                    "-pretrained_weights", str(prognosis["base"])], env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"nnUNetv2_train: error: {prognosis['base']} is a CT-only model; EarlyFusionClinicalTrainer continues from "
        f"an EarlyFusionSurvivalTrainer checkpoint")
    fold_1 = _checkpoint(env, CTPET, "EarlyFusionClinicalTrainer").parent.parent / "fold_1"
    assert not list(fold_1.glob("*.pth"))  # (nnU-Net's own __init__ has made the folder and its log by then)
    # an existing CSV is kept
    risks = tmp_path / "risks.csv"
    risks.write_text("kept\n")
    proc = run_cli(["pemma", "predict-risk", "-i", str(raw / "imagesTr"), "-o", str(risks), "-d", "612", "-c",
                    CONFIG, "-tr", "PEMMAClinicalTrainer", "-device", "cpu"], env)
    assert proc.stderr.strip() == f"pemma predict-risk: error: {risks} already exists; pass --overwrite to replace it"
    assert risks.read_text() == "kept\n"


def test_segmentation_models_and_datasets_without_outcomes_are_refused(workflow, tmp_path):
    """On the README workflow's CT dataset (converted without --with-outcomes) and its UNETR."""
    env = workflow["env"]
    raw = Path(env["nnUNet_raw"]) / "Dataset501_HNC_CT"
    risks = tmp_path / "risks.csv"
    proc = run_cli(["pemma", "predict-risk", "-i", str(raw / "imagesTr"), "-o", str(risks), "-d", "501", "-c",
                    "3d_unetr_tiny", "-tr", "UNETRTrainer", "-device", "cpu"], env)
    assert proc.returncode == 2 and not risks.exists()
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "pemma predict-risk: error: UNETRTrainer has no survival head; predict-risk takes a prognosis model")
    proc = run_cli(["nnUNetv2_train", "501", "3d_unetr_tiny", "1", "-tr", "SurvivalUNETRTrainer", "-device", "cpu"],
                   env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"nnUNetv2_train: error: no outcomes.json in {raw}: convert with pemma convert-hecktor ... --with-outcomes")
    # refused before nnU-Net makes its output folder
    assert not (Path(env["nnUNet_results"]) / "Dataset501_HNC_CT" / "SurvivalUNETRTrainer__nnUNetPlans__3d_unetr_tiny"
                / "fold_1").exists()
