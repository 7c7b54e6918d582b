"""Bad input to `pemma predict` / `pemma predict-late-fusion` stops with one line naming the file or case, before
any model is loaded."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nnunetv2_pemma.errors import PlansError
from nnunetv2_pemma.inference.late_fusion import ModelRef, predict_late_fusion
from nnunetv2_pemma.inference.predictor import build_predictor

CT = ModelRef("Dataset501_HNC_CT", "UNETRTrainer", "3d_unetr_tiny")
PET = ModelRef("Dataset505_HNC_PET_MDA", "UNETRTrainer", "3d_unetr_tiny")


def _inputs(folder: Path, files: list[str]) -> Path:
    folder.mkdir()
    for name in files:
        (folder / name).touch()
    return folder


def test_missing_checkpoint_is_named(tmp_path: Path) -> None:
    with pytest.raises(PlansError, match=re.escape(f"no checkpoint {tmp_path / 'fold_1' / 'checkpoint_final.pth'}")):
        build_predictor(tmp_path, [1], None)


@pytest.mark.parametrize("modalities,ct,pet,w_ct,message", [
    (["CT", "PET"], CT, PET, 1.5, r"--w-ct must lie in \[0, 1\], got 1.5"),
    (["CT", "PET"], CT, None, 0.5, r"--modalities \['CT', 'PET'\]: late fusion needs CT and/or PET, each with its"),
    (["MR"], CT, PET, 0.5, r"--modalities \['MR'\]: late fusion needs"),
])
def test_late_fusion_rejects_bad_arguments(tmp_path: Path, modalities: list[str], ct: ModelRef | None,
                                           pet: ModelRef | None, w_ct: float, message: str) -> None:
    inputs = _inputs(tmp_path / "in", ["A_0000.nii.gz", "A_0001.nii.gz"])
    with pytest.raises(PlansError, match=message):
        predict_late_fusion(inputs, tmp_path / "out", modalities, ct, pet, w_ct=w_ct)


def test_late_fusion_names_the_case_missing_a_channel(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path / "in", ["A_0000.nii.gz", "A_0001.nii.gz", "B_0000.nii.gz"])
    with pytest.raises(PlansError, match=re.escape(f"case B in {inputs}: channel file(s) [1] missing")):
        predict_late_fusion(inputs, tmp_path / "out", ["CT", "PET"], CT, PET)
    empty = _inputs(tmp_path / "empty", [])
    with pytest.raises(PlansError, match=re.escape(f"{empty}: no CASE_0000.nii.gz files")):
        predict_late_fusion(empty, tmp_path / "out", ["CT"], CT, None)
    assert not (tmp_path / "out").exists()
