"""The peers as `pemma compare` trains them at the tiny presets (conftest's `reproduction`), through nnU-Net's
commands: nnU-Net's U-Net under a preset, H2ASeg (CP, C and P inference) and the 2.5D slice-interaction network
(from scratch and fine-tuned), then the command's peer table, checked against the models it trained."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import IN_PROCESS_PREDICTION, first_case_inputs, run_cli, run_ok

pytestmark = pytest.mark.slow

CTPET = "Dataset502_HNC_CTPET_MDA"
PEERS = {"unet_tiny": ("3d_fullres_unet_tiny", "nnUNetPresetTrainer"),
         "h2aseg_tiny": ("3d_h2aseg_tiny", "H2ASegTrainer"),
         "slices25d_tiny": ("2d_slices25d_tiny", "SliceInteractionTrainer")}


def _checkpoint(env: dict[str, str], trainer: str, config: str) -> Path:
    return Path(env["nnUNet_results"]) / CTPET / f"{trainer}__nnUNetPlans__{config}" / "fold_0" / "checkpoint_final.pth"


@pytest.fixture(scope="module")
def peers(reproduction: dict) -> dict:
    """Every peer trained by `pemma compare` on the CT+PET dataset (502, MDA) with fold 0, beside early fusion and
    PEMMA from the CT base and the 2.5D network fine-tuned from its model pre-trained on the other centres."""
    return reproduction


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
            "-tr", trainer, "-f", "0", "-device", "cpu", "--disable_tta", *IN_PROCESS_PREDICTION], env)
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


def test_compare_writes_the_peer_table_of_the_models_it_trained(peers: dict, tmp_path: Path) -> None:
    """`pemma compare`'s own table (comparison.csv/.md/.png): every row and input, scored on MDA's labelled test
    cases, parameters from the trained networks; H2ASeg's CT+PET cell re-scored here from nnU-Net's own
    prediction of the same cases."""
    from nnunetv2_pemma.experiments.compare import LABELS, METRICS, ROWS

    root = peers["root"]
    with (root / "comparison.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["infer"]) for r in rows] == [(row.name, i) for row in ROWS for i in row.infers]
    for r in rows:
        assert r["cases"] == "2", r  # the phantom's two labelled test cases of MDA, never its training cases
        for column in (f"{label} {metric}" for label in LABELS for metric in METRICS):
            value = float(r[column])
            assert math.isnan(value) or (0 <= value <= 1 if not column.endswith("hd95_mm") else value >= 0)
        assert 0 < int(r["trainable"]) <= int(r["total"]) and float(r["inference_s_per_case"]) > 0
    for name in ("PEMMA", "PEMMA on nnU-Net's U-Net"):
        row = next(r for r in rows if r["method"] == name)
        assert int(row["trainable"]) < 0.2 * int(row["total"]), name
    early = next(r for r in rows if r["method"] == "UNETR early fusion")
    # all but MONAI's unused cross-attention norms
    assert 0.99 * int(early["total"]) < int(early["trainable"]) < int(early["total"])
    markdown = (root / "comparison.md").read_text()
    assert markdown.count("\n| ") == len(rows) + 1  # the header and a line per row
    assert all(line in peers["compare_stdout"] for line in markdown.splitlines() if line.startswith("|"))
    assert (root / "comparison.png").stat().st_size > 0

    raw = Path(peers["env"]["nnUNet_raw"]) / CTPET
    (tmp_path / "in").mkdir()
    for image in (raw / "imagesTs").glob("*.nii.gz"):
        (tmp_path / "in" / image.name).symlink_to(image)
    config, trainer = PEERS["h2aseg_tiny"]
    run_ok(["nnUNetv2_predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-d", "502", "-c", config,
            "-tr", trainer, "-f", "0", "-device", "cpu", "--disable_tta", *IN_PROCESS_PREDICTION], peers["env"])
    run_ok(["pemma", "evaluate", "--pred", str(tmp_path / "out"), "--gt", str(raw / "labelsTs"), "--json",
            str(tmp_path / "scores.json")], peers["env"])
    mean = json.loads((tmp_path / "scores.json").read_text())["mean"]
    cell = next(r for r in rows if r["method"] == "H2ASeg" and r["infer"] == "CP")
    for label in LABELS:
        expected = mean[label]["dice"]
        assert math.isclose(float(cell[f"{label} dice"]), expected, abs_tol=1e-6) if expected is not None \
            else math.isnan(float(cell[f"{label} dice"])), label
