"""`pemma predict` checks its inputs, its output folder and the model's base before nnU-Net writes anything."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import CONFIG, run_cli, run_ok
from nnunetv2_pemma.adaptation.provenance import base_fingerprint
from nnunetv2_pemma.errors import CheckpointError
from nnunetv2_pemma.inference.predictor import build_predictor

pytestmark = pytest.mark.slow


def _one_case(env: dict[str, str], channels: list[int], folder: Path) -> tuple[str, Path]:
    images = Path(env["nnUNet_raw"]) / "Dataset502_HNC_CTPET_MDA" / "imagesTr"
    case = sorted(images.glob("*_0000.nii.gz"))[0].name[:-len("_0000.nii.gz")]
    folder.mkdir(parents=True)
    for c in channels:
        (folder / f"{case}_{c:04d}.nii.gz").symlink_to(images / f"{case}_{c:04d}.nii.gz")
    return case, folder


def _predict(env: dict[str, str], inputs: Path, out: Path, *extra: str):
    return run_cli(["pemma", "predict", "-np", "0", "-i", str(inputs), "-o", str(out), "-d", "502", "-c", CONFIG,
                    "-tr", "PEMMATrainer", "-f", "0", "-device", "cpu", "--disable_tta", *extra], env)


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("pemma predict: error: ")]
    assert len(lines) == 1
    return lines[0]


def test_missing_pet_file_names_the_case_and_suggests_ct_only(workflow: dict, tmp_path: Path) -> None:
    case, inputs = _one_case(workflow["env"], [0], tmp_path / "in")
    out = tmp_path / "out"
    proc = _predict(workflow["env"], inputs, out)
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr)
    assert f"case {case} in {inputs}: no {case}_0001.nii.gz (PET)" in line and "--modalities CT" in line
    assert not out.exists()  # nnU-Net used to leave plans.json and dataset.json here


def test_existing_predictions_are_kept_unless_overwrite(workflow: dict, tmp_path: Path) -> None:
    case, inputs = _one_case(workflow["env"], [0, 1], tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    previous = out / f"{case}.nii.gz"
    previous.write_bytes(b"an earlier prediction")
    proc = _predict(workflow["env"], inputs, out)
    assert proc.returncode == 2
    assert "already holds predictions of 1 of the 1 input cases" in _one_error_line(proc.stderr)
    assert previous.read_bytes() == b"an earlier prediction" and sorted(p.name for p in out.iterdir()) == [previous.name]
    run_ok(["pemma", "predict", "-np", "0", "-i", str(inputs), "-o", str(out), "-d", "502", "-c", CONFIG,
            "-tr", "PEMMATrainer", "-f", "0", "-device", "cpu", "--disable_tta", "--overwrite"], workflow["env"])
    assert previous.read_bytes()[:2] == b"\x1f\x8b"  # now nnU-Net's gzipped NIfTI


def test_a_pemma_checkpoint_on_another_base_is_refused(workflow: dict, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint records the fingerprint of the CT base its adapters were trained on; a model folder whose base
    tensors were changed afterwards (weights copied in by hand) no longer matches it."""
    for name, value in workflow["env"].items():
        if name.startswith("nnUNet_"):  # nnU-Net finds the trainer class through nnUNet_extTrainer
            monkeypatch.setenv(name, value)
    folder = tmp_path / "model"
    shutil.copytree(workflow["adapted"].parent.parent, folder)
    path = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    base = torch.load(workflow["base"], map_location="cpu", weights_only=False)["network_weights"]
    checkpoint["init_args"]["pemma_base"] = {"base_fingerprint": base_fingerprint(base),
                                             "base_file": str(workflow["base"])}
    torch.save(checkpoint, path)
    build_predictor(folder, [0], None)  # the record fits: accepted

    key = "vit.blocks.0.mlp.linear1.weight"
    checkpoint["network_weights"][key] = checkpoint["network_weights"][key] + 1e-6
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=f"{path}: its base tensors differ from the CT base its adapters were "
                                              f"trained on \\({workflow['base']}\\)"):
        build_predictor(folder, [0], None)
