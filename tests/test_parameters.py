"""`pemma parameters` for every preset's backbone: the counts come from the networks the trainers build."""

from __future__ import annotations

import pytest

from conftest import run_ok

from nnunetv2_pemma.adaptation.methods import train_only
from nnunetv2_pemma.config import MODALITIES
from nnunetv2_pemma.evaluation.parameters import measure
from nnunetv2_pemma.networks.build import build_pemma_network
from nnunetv2_pemma.networks.modality_slots import count_parameters
from nnunetv2_pemma.plans import load_preset


@pytest.mark.parametrize("preset", ["tiny", "swin_tiny"])
def test_rows_follow_the_preset_backbone(preset: str) -> None:
    rows = measure(preset)
    spec = load_preset(preset)
    assert rows[0]["method"] == f"CT {spec.model.architecture} (base, Phi)"
    assert ("Early fusion" in [r["method"] for r in rows]) == (spec.model.architecture == "UNETR")
    pemma = build_pemma_network(spec.block(MODALITIES), 3, spec.patch_size)
    train_only(pemma, "adaptation")
    assert (rows[-1]["total"], rows[-1]["trainable"]) == count_parameters(pemma)
    assert 0 < rows[-1]["adapter_bytes"] < rows[-1]["checkpoint_bytes"]


def test_swin_preset_prints_its_table(nnunet_env: dict[str, str]) -> None:
    out = run_ok(["pemma", "parameters", "--preset", "swin_tiny"], nnunet_env).stdout
    assert "| CT SwinUNETR (base, Phi) |" in out and "PEMMA (lora, r=4)" in out and "Early fusion" not in out
