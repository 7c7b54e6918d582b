"""Bad input to `pemma predict` / `pemma predict-late-fusion` stops with one line naming the file or case, before
any model is loaded."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nnunetv2_pemma.errors import InputDataError, PlansError
from nnunetv2_pemma.inference.inputs import input_cases, refuse_existing_predictions
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
    with pytest.raises(InputDataError, match=re.escape(f"case B in {inputs}: no B_0001.nii.gz (PET)")):
        predict_late_fusion(inputs, tmp_path / "out", ["CT", "PET"], CT, PET)
    empty = _inputs(tmp_path / "empty", [])
    with pytest.raises(InputDataError, match=re.escape(f"{empty}: no CASE_0000.nii.gz files")):
        predict_late_fusion(empty, tmp_path / "out", ["CT"], CT, None)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("files,modalities,message", [
    (["A_0000.nii.gz", "A_0001.nii.gz", "B_0000.nii.gz"], ["CT", "PET"],
     "case B in {d}: no B_0001.nii.gz (PET); the model takes CT, PET as _0000..._0001; to predict from the files "
     "present, pass --modalities CT"),
    (["A_0001.nii.gz"], ["CT", "PET"], "case A in {d}: no A_0000.nii.gz (CT); the model takes CT, PET as"),
    (["A_0000.nii.gz", "A_0001.nii.gz"], ["CT"],
     "case A in {d}: A_0001.nii.gz beyond the 1 channel(s) CT the model takes"),
    ([], ["CT"], "{d}: no CASE_0000.nii.gz files"),
])
def test_input_folder_problems_name_the_case_and_the_file(tmp_path: Path, files: list[str], modalities: list[str],
                                                         message: str) -> None:
    inputs = _inputs(tmp_path / "in", files)
    with pytest.raises(InputDataError, match=re.escape(message.format(d=inputs))):
        input_cases(inputs, modalities)


def test_input_cases_and_existing_predictions(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path / "in", ["A_0000.nii.gz", "A_0001.nii.gz", "B_0000.nii.gz", "B_0001.nii.gz"])
    assert input_cases(inputs, ["CT", "PET"]) == ["A", "B"]
    out = _inputs(tmp_path / "out", ["B.nii.gz"])
    refuse_existing_predictions(out, ["A"], overwrite=False)
    refuse_existing_predictions(out, ["A", "B"], overwrite=True)
    with pytest.raises(InputDataError, match=re.escape(f"{out} already holds predictions of 1 of the 2 input cases "
                                                       f"(B); pass --overwrite to replace them")):
        refuse_existing_predictions(out, ["A", "B"], overwrite=False)
