"""The peers through nnU-Net's commands on the session's phantom workflow (tiny presets): nnU-Net's U-Net under a
preset, H2ASeg (CP, C and P inference) and the 2.5D slice-interaction network (from scratch and fine-tuned),
then the peer table's scoring of every row."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import CONFIG, first_case_inputs, run_cli, run_ok

pytestmark = pytest.mark.slow

CTPET = "Dataset502_HNC_CTPET_MDA"
PEERS = {"unet_tiny": ("3d_fullres_unet_tiny", "nnUNetPresetTrainer"),
         "h2aseg_tiny": ("3d_h2aseg_tiny", "H2ASegTrainer"),
         "slices25d_tiny": ("2d_slices25d_tiny", "SliceInteractionTrainer")}


def _checkpoint(env: dict[str, str], trainer: str, config: str) -> Path:
    return Path(env["nnUNet_results"]) / CTPET / f"{trainer}__nnUNetPlans__{config}" / "fold_0" / "checkpoint_final.pth"


@pytest.fixture(scope="module")
def peers(workflow: dict) -> dict:
    """Every peer trained on the workflow's CT+PET dataset (502, MDA) with fold 0, plus early fusion from the CT
    base and the 2.5D network fine-tuned from its from-scratch model: the rows of the peer table."""
    env = workflow["env"]
    for preset, (config, trainer) in PEERS.items():
        run_ok(["pemma", "plans", "add", "501", "--preset", preset], env)
        run_ok(["pemma", "plans", "transfer", "501", "502", "--preset", preset], env)
        run_ok(["nnUNetv2_train", "502", config, "0", "-tr", trainer, "-device", "cpu"], env)
    scratch = _checkpoint(env, "SliceInteractionTrainer", "2d_slices25d_tiny")
    run_ok(["nnUNetv2_train", "502", "2d_slices25d_tiny", "0", "-tr", "SliceInteractionFineTuningTrainer", "-device",
            "cpu", "-pretrained_weights", str(scratch)], env)
    run_ok(["nnUNetv2_train", "502", CONFIG, "0", "-tr", "EarlyFusionTrainer", "-device", "cpu",
            "-pretrained_weights", str(workflow["base"])], env)
    return {"env": env}


def _inputs(env: dict[str, str], folder: Path, modalities: list[str]) -> str:
    """The first 502 case's images for `modalities`, as a prediction input folder; returns the case id."""
    return first_case_inputs(Path(env["nnUNet_raw"]) / CTPET / "imagesTr", modalities, folder)


def _labels(path: Path) -> set[int]:
    return set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).tolist())


@pytest.mark.parametrize("preset", ["unet_tiny", "h2aseg_tiny"])
def test_3d_peers_predict_with_nnunetv2_predict(peers: dict, tmp_path: Path, preset: str) -> None:
    config, trainer = PEERS[preset]
    env = peers["env"]
    case = _inputs(env, tmp_path / "in", ["CT", "PET"])
    run_ok(["nnUNetv2_predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-d", "502", "-c", config,
            "-tr", trainer, "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env)
    assert _labels(tmp_path / "out" / f"{case}.nii.gz") <= {0, 1, 2}
    validation = _checkpoint(env, trainer, config).parent / "validation" / "summary.json"
    assert validation.is_file()  # nnU-Net's own final validation ran


@pytest.mark.parametrize("modalities", [["CT"], ["PET"]])
def test_h2aseg_takes_a_missing_modality_as_a_zero_image(peers: dict, tmp_path: Path, modalities: list[str]) -> None:
    env = peers["env"]
    case = _inputs(env, tmp_path / "in", modalities)
    run_ok(["pemma", "predict", "-np", "0", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-d", "502",
            "-c", "3d_h2aseg_tiny", "-tr", "H2ASegTrainer", "-f", "0", "-device", "cpu", "--disable_tta",
            "--modalities", *modalities], env)
    assert _labels(tmp_path / "out" / f"{case}.nii.gz") <= {0, 1, 2}


def test_h2aseg_trains_every_level_with_the_papers_weights(peers: dict, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's own loss, as nnUNetv2_train builds it: nnU-Net's deep-supervision wrapper over one output per
    level with weights (6 - k) for k = 1..5 in the paper, i.e. (4 - k) / 6 for the tiny preset's 3 levels."""
    import torch

    from nnunetv2_pemma.trainers.benchmarking.step_timing import H2ASegTrainer_stepTiming

    monkeypatch.setenv("nnUNet_preprocessed", peers["env"]["nnUNet_preprocessed"])
    monkeypatch.setenv("nnUNet_results", str(tmp_path))  # the trained model's folder stays untouched
    trainer = H2ASegTrainer_stepTiming.started(502, "3d_h2aseg_tiny", "cpu")
    assert trainer.loss.weight_factors == pytest.approx((3 / 6, 2 / 6, 1 / 6))
    outputs = trainer.network(trainer.batch["data"])
    assert [tuple(o.shape[2:]) for o in outputs] == [(32, 32, 32), (16, 16, 16), (8, 8, 8)]
    assert [tuple(t.shape[2:]) for t in trainer.batch["target"]] == [(32, 32, 32), (16, 16, 16), (8, 8, 8)]
    assert math.isfinite(float(trainer.timed_step()["loss"])) and type(trainer.optimizer) is torch.optim.Adam


def test_slice_interaction_validates_and_predicts_on_stacked_slices(peers: dict, tmp_path: Path) -> None:
    env = peers["env"]
    folder = _checkpoint(env, "SliceInteractionTrainer", "2d_slices25d_tiny").parent
    summary = json.loads((folder / "validation" / "summary.json").read_text())
    assert "mean" in summary  # nnU-Net's final validation ran through the stacked-slice dataset
    case = _inputs(env, tmp_path / "in", ["CT", "PET"])
    for modalities, sub in ((["CT", "PET"], "cp"), (["CT"], "c")):
        inputs = tmp_path / "in" if sub == "cp" else tmp_path / "in_c"
        if sub == "c":
            _inputs(env, inputs, modalities)
        run_ok(["pemma", "predict", "-np", "0", "-i", str(inputs), "-o", str(tmp_path / sub), "-d", "502",
                "-c", "2d_slices25d_tiny", "-tr", "SliceInteractionTrainer", "-f", "0", "-device", "cpu",
                "--disable_tta", "--modalities", *modalities], env)
        assert _labels(tmp_path / sub / f"{case}.nii.gz") <= {0, 1, 2}


def test_nnunetv2_predict_refuses_a_2_5d_model_in_one_line(peers: dict, tmp_path: Path) -> None:
    env = peers["env"]
    _inputs(env, tmp_path / "in", ["CT", "PET"])
    proc = run_cli(["nnUNetv2_predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-d", "502", "-c",
                    "2d_slices25d_tiny", "-tr", "SliceInteractionTrainer", "-f", "0", "-device", "cpu"], env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("nnUNetv2_predict: error: a 2.5D model")
    assert "Traceback" not in proc.stderr and "pemma predict" in proc.stderr
    assert not list((tmp_path / "out").glob("*.nii.gz")) if (tmp_path / "out").exists() else True


def test_fine_tuning_needs_its_pretrained_model(peers: dict) -> None:
    proc = run_cli(["nnUNetv2_train", "502", "2d_slices25d_tiny", "1", "-tr", "SliceInteractionFineTuningTrainer",
                    "-device", "cpu"], peers["env"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "nnUNetv2_train: error: SliceInteractionFineTuningTrainer fine-tunes a pre-trained 2.5D model")


def test_peer_table_scores_every_row(workflow: dict, peers: dict, cnn_models: dict) -> None:
    """`pemma compare`'s scoring on the workflow's models (the tiny presets stand in for the demo's)."""
    from nnunetv2_pemma.experiments.compare import LABELS, METRICS, ROWS, Comparison, score_rows, write_table

    comparison = Comparison(workflow["root"], workflow["root"] / "hecktor", "tiny", "cpu")
    rows = score_rows(comparison, tta=False)
    assert [(r["method"], r["infer"]) for r in rows] == [(row.name, i) for row in ROWS for i in row.infers]
    for r in rows:
        # MDA's labelled test cases (the workflow's phantom has 2 per centre), never its training cases
        assert (r["cases"], r["scored_on"]) == (2, "labelled test cases"), r
        for column in (f"{label} {metric}" for label in LABELS for metric in METRICS):
            value = r[column]
            assert math.isnan(value) or (0 <= value <= 1 if not column.endswith("hd95_mm") else value >= 0)
        assert 0 < r["trainable"] <= r["total"] and r["inference_s_per_case"] > 0
    for name in ("PEMMA", "PEMMA on nnU-Net's U-Net"):
        row = next(r for r in rows if r["method"] == name)
        assert row["trainable"] < 0.2 * row["total"], name
    pemma = next(r for r in rows if r["method"] == "PEMMA")
    early = next(r for r in rows if r["method"] == "UNETR early fusion")
    assert pemma["trainable"] < 0.2 * pemma["total"]
    assert 0.99 * early["total"] < early["trainable"] < early["total"]  # all but MONAI's unused cross-attention norms
    paths = write_table(rows, workflow["root"], "peer_test")
    assert all(p.stat().st_size > 0 for p in paths.values())
    assert paths["md"].read_text().count("\n| ") == len(rows) + 1
