"""`pemma reproduce --scope demo` end to end at the tiny preset (conftest's `reproduction`): the command's own
Table 2, claims and parameter files, each checked against the models it trained, re-scored here through nnU-Net's
own prediction command and `pemma evaluate`.

At 30 iterations the tiny UNETRs segment little, so these cells check the wiring (which model, which inputs, which
cases, which labels), not a score; test_pemma_cnn_workflow's Dice floor checks that a trained model segments."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import IN_PROCESS_PREDICTION, run_ok

pytestmark = pytest.mark.slow

ADAPTATION = "Multimodal adaptation"
MDA = "Dataset502_HNC_CTPET_MDA"


def test_reproduce_writes_table_2_claims_and_parameters(reproduction: dict) -> None:
    root = reproduction["root"]
    table = pd.read_csv(root / "table2.csv")
    assert {"PEMMA", "Early fusion", "Late fusion"} <= set(table["method"])
    for method in ("PEMMA", "Early fusion", "Late fusion"):
        rows = table[(table["method"] == method) & (table["stage"] == ADAPTATION) & (table["train"] == "CP")]
        assert sorted(rows["infer"]) == ["C", "CP", "P"], method
    assert set(table["stage"]) == {ADAPTATION, "New dataset 1"}  # the demo scope: one new centre
    assert (table["cases"] == 2).all()  # the phantom's two labelled test cases of each centre
    assert all((root / name).stat().st_size > 0 for name in ("table2.md", "table2.png", "claims.txt",
                                                             "parameters.md"))
    stdout = reproduction["reproduce_stdout"]
    assert (root / "table2.md").read_text().strip() in stdout
    claims = (root / "claims.txt").read_text().strip().splitlines()
    assert len(claims) >= 3 and all(line in stdout for line in claims)


@pytest.mark.parametrize("trainer, dataset, stage, train, channels", [
    ("PEMMATrainer", MDA, ADAPTATION, "CP", [0, 1]),
    ("EarlyFusionTrainer", MDA, ADAPTATION, "CP", [0, 1]),
])
def test_table_2_cells_are_the_scores_of_the_trained_models(reproduction: dict, tmp_path: Path, trainer: str,
                                                            dataset: str, stage: str, train: str,
                                                            channels: list[int]) -> None:
    """A cell's per-case Dice equals the model's own prediction of the same cases by `nnUNetv2_predict`, scored by
    `pemma evaluate` against the converted labels."""
    env, root = reproduction["env"], reproduction["root"]
    raw = Path(env["nnUNet_raw"]) / dataset
    cases = sorted(p.name[:-len("_0000.nii.gz")] for p in (raw / "imagesTs").glob("*_0000.nii.gz"))
    inputs = tmp_path / "in"
    inputs.mkdir()
    for case in cases:
        for i, c in enumerate(channels):
            (inputs / f"{case}_{i:04d}.nii.gz").symlink_to(raw / "imagesTs" / f"{case}_{c:04d}.nii.gz")
    run_ok(["nnUNetv2_predict", "-i", str(inputs), "-o", str(tmp_path / "out"), "-d", dataset[7:10], "-c",
            "3d_unetr_tiny", "-tr", trainer, "-f", "0", "-device", "cpu", "--disable_tta", *IN_PROCESS_PREDICTION],
           env)
    run_ok(["pemma", "evaluate", "--pred", str(tmp_path / "out"), "--gt", str(raw / "labelsTs"), "--json",
            str(tmp_path / "scores.json")], env)
    ours = {c["case"]: c for c in json.loads((tmp_path / "scores.json").read_text())["per_case"]}
    method = {"PEMMATrainer": "PEMMA", "EarlyFusionTrainer": "Early fusion"}[trainer]
    cells = pd.read_csv(root / "table2_cases.csv")
    cells = cells[(cells["method"] == method) & (cells["stage"] == stage) & (cells["train"] == train)
                  & (cells["infer"] == "CP")]
    assert sorted(cells["case"]) == cases == sorted(ours)
    for _, cell in cells.iterrows():
        for label, metric in (("GTVp", "Tumor"), ("GTVn", "Lymph")):
            expected = ours[cell["case"]][label]["dice"]
            expected = np.nan if expected is None else float(expected)
            assert np.isclose(cell[metric], expected, atol=1e-6, equal_nan=True), (cell["case"], label)
