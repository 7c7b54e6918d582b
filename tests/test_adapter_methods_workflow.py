"""Context priors and the mixture of adapters through nnU-Net's own commands (tiny preset, phantom data): adaptation
on MDA CT+PET (502) and a continual update on HGJ CT (503) from the session's CT base, then C, P and CP inference,
resumed and validated runs, and a model rebuilt from a CT base, the adapter and an expert file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import CONFIG, IN_PROCESS_PREDICTION, checkpoint_of, run_cli, run_ok, weights, workspace_copy
from nnunetv2_pemma.adaptation.methods import is_added
from nnunetv2_pemma.adaptation.mixture import expert_parameter_key
from nnunetv2_pemma.inference.predictor import _center_groups
from test_trainer_errors import one_line_error

pytestmark = pytest.mark.slow

TRAINERS = {"moa": ("PEMMAMoATrainer", "PEMMAMoAContinualTrainer"),
            "prior": ("PEMMAPriorTrainer", "PEMMAPriorContinualTrainer")}


@pytest.fixture(scope="module")
def methods(workflow: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each method's adaptation and continual update, trained in a copy of the session's workflow."""
    workspace = workspace_copy(workflow, tmp_path_factory.mktemp("methods") / "workspace")
    env = workspace["env"]
    out = {"workspace": workspace, "env": env}
    for method, (adapting, continual) in TRAINERS.items():
        run_ok(["nnUNetv2_train", "502", CONFIG, "0", "-tr", adapting, "-device", "cpu",
                "-pretrained_weights", str(workflow["base"])], env)
        adapted = checkpoint_of(env, "Dataset502_HNC_CTPET_MDA", adapting)
        run_ok(["nnUNetv2_train", "503", CONFIG, "0", "-tr", continual, "-device", "cpu",
                "-pretrained_weights", str(adapted)], env)
        out[method] = (adapted, checkpoint_of(env, "Dataset503_HNC_CT_HGJ", continual))
    return out


def _adaptation(checkpoint: Path) -> dict:
    plans = json.loads((checkpoint.parent.parent / "plans.json").read_text())
    return plans["configurations"][CONFIG]["pemma"]["adaptation"]


def test_a_new_centre_gets_its_own_expert_and_nothing_else_moves(workflow: dict, methods: dict) -> None:
    adapted, continual = methods["moa"]
    assert _adaptation(adapted)["moa_experts"] == ["MDA"]
    assert _adaptation(continual)["moa_experts"] == ["MDA", "HGJ"]
    base, before, after = weights(workflow["base"]), weights(adapted), weights(continual)
    assert all(torch.equal(base[k], before[k]) and torch.equal(base[k], after[k]) for k in base)
    assert set(after) - set(before) == {k for k in after if expert_parameter_key(k) == "HGJ"}
    unchanged = [k for k in before if not torch.equal(before[k], after[k])]
    assert not unchanged, f"the HGJ update changed {unchanged[:3]}"  # MDA's expert, PET modules: bit-identical
    assert any(after[k].abs().sum() > 0 for k in after if expert_parameter_key(k) == "HGJ" and ".B_" in k)
    assert any(before[k].abs().sum() > 0 for k in before if expert_parameter_key(k) == "MDA" and ".B_" in k)
    assert sorted(p.name for p in (continual.parent / "experts").iterdir()) == ["HGJ.safetensors"]
    assert sorted(p.name for p in (adapted.parent / "experts").iterdir()) == ["MDA.safetensors"]


def test_base_adapter_and_expert_files_make_the_updated_model(workflow: dict, methods: dict, tmp_path: Path) -> None:
    adapted, continual = methods["moa"]
    run_ok(["pemma", "apply-adapter", "--base", str(workflow["base"]), "--adapter",
            str(adapted.parent / "adapter_final.safetensors"), "--experts",
            str(continual.parent / "experts" / "HGJ.safetensors"), "--out", str(tmp_path / "merged")], workflow["env"])
    merged, expected = weights(tmp_path / "merged" / "fold_0" / "checkpoint_final.pth"), weights(continual)
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in expected)
    experts_bytes = (continual.parent / "experts" / "HGJ.safetensors").stat().st_size
    assert experts_bytes < (adapted.parent / "adapter_final.safetensors").stat().st_size


def test_prior_continual_update_changes_only_priors_and_lora(workflow: dict, methods: dict) -> None:
    adapted, continual = methods["prior"]
    assert _adaptation(continual)["method"] == "prior"
    before, after = weights(adapted), weights(continual)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("prior_context.") for k in changed) and any("lora_" in k for k in changed)
    assert all(k.startswith("prior_context.") or "lora_" in k for k in changed), sorted(changed)
    assert {k for k in before if is_added(k) and k.startswith("prior_")} and all(
        torch.equal(weights(workflow["base"])[k], after[k]) for k in weights(workflow["base"]))


PREDICT_SUBSETS = """
import sys
from pathlib import Path
from nnunetv2_pemma.inference.predictor import predict

root, trainer = Path(sys.argv[1]), sys.argv[2]
for name in ("CT_PET", "CT", "PET"):
    predict(root / f"in_{name}", root / f"out_{name}", "503", sys.argv[3], trainer, [0],
            modalities=name.split("_"), tta=False, num_processes=0)
"""


@pytest.mark.parametrize("method", sorted(TRAINERS))
def test_predict_any_modality_subset(workflow: dict, methods: dict, tmp_path: Path, method: str) -> None:
    """C, P and CP inference from the updated model, whose last data had CT alone (an MDA case and a case of the
    new centre, which a centre-routed mixture predicts with another expert). One process for the three, as
    `pemma predict` calls `predict`; the command itself is tested in test_workflow.py."""
    env = methods["env"]
    images = Path(env["nnUNet_raw"]) / "Dataset502_HNC_CTPET_MDA" / "imagesTr"
    case = sorted(images.glob("*_0000.nii.gz"))[0].name[:-len("_0000.nii.gz")]
    for name, channels in (("CT_PET", [0, 1]), ("CT", [0]), ("PET", [1])):
        (tmp_path / f"in_{name}").mkdir()
        for target in (case, "HGJ-999"):
            for i, c in enumerate(channels):
                (tmp_path / f"in_{name}" / f"{target}_{i:04d}.nii.gz").symlink_to(images / f"{case}_{c:04d}.nii.gz")
    proc = subprocess.run([sys.executable, "-c", PREDICT_SUBSETS, str(tmp_path), TRAINERS[method][1], CONFIG],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(images / f"{case}_0000.nii.gz")))
    for name in ("CT_PET", "CT", "PET"):
        for target in (case, "HGJ-999"):
            pred = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"out_{name}" / f"{target}.nii.gz")))
            assert pred.shape == ct.shape and set(np.unique(pred)) <= {0, 1, 2}


def test_nnunet_predict_uses_the_unknown_centre_rule(workflow: dict, methods: dict, tmp_path: Path) -> None:
    """nnUNetv2_predict passes no case ids: the centre-routed model averages its experts (and runs)."""
    env = methods["env"]
    images = Path(env["nnUNet_raw"]) / "Dataset503_HNC_CT_HGJ" / "imagesTr"
    case = sorted(images.glob("*_0000.nii.gz"))[0].name[:-len("_0000.nii.gz")]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / f"{case}_0000.nii.gz").symlink_to(images / f"{case}_0000.nii.gz")
    run_ok(["nnUNetv2_predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-d", "503", "-c", CONFIG,
            "-tr", "PEMMAMoAContinualTrainer", "-f", "0", "-device", "cpu", "--disable_tta", *IN_PROCESS_PREDICTION],
           env)
    assert (tmp_path / "out" / f"{case}.nii.gz").is_file()


def test_pemma_predict_groups_cases_by_centre_for_a_centre_routed_mixture() -> None:
    class Net(torch.nn.Module):
        def __init__(self, method: str, routing: str) -> None:
            super().__init__()
            self.adaptation = type("A", (), {"method": method, "moa_routing": routing})()

    cases = ["MDA-001", "HGJ-002", "MDA-003"]
    assert _center_groups(Net("moa", "center"), cases) == [("HGJ", ["HGJ-002"]), ("MDA", ["MDA-001", "MDA-003"])]
    assert _center_groups(Net("moa", "modality"), cases) == [(None, cases)]
    assert _center_groups(Net("lora", "center"), cases) == [(None, cases)]


def test_resumed_and_validated_continual_runs_rebuild_the_network(methods: dict, tmp_path: Path) -> None:
    """`--c` and `--val` rebuild the continual network from the run's own checkpoint: the mixture with the new
    centre's expert, which the dataset's plans do not list (context priors take the same path: the method
    options its checkpoint records)."""
    method = "moa"
    workspace = workspace_copy(methods["workspace"], tmp_path / "workspace")  # the test adds a fold
    env = workspace["env"]
    continual = workspace["root"] / methods[method][1].relative_to(methods["workspace"]["root"])
    trainer = TRAINERS[method][1]
    fold = continual.parent.parent / "fold_3"
    fold.mkdir()
    checkpoint = torch.load(continual, map_location="cpu", weights_only=False)
    checkpoint["current_epoch"] = 1  # one epoch left: the resumed run trains it
    torch.save(checkpoint, fold / "checkpoint_latest.pth")
    run_ok(["nnUNetv2_train", "503", CONFIG, "3", "-tr", trainer, "-device", "cpu", "--c"], env)
    resumed, before = weights(fold / "checkpoint_final.pth"), weights(continual)
    assert resumed.keys() == before.keys()
    frozen = [k for k in before if expert_parameter_key(k) != "HGJ"]
    assert all(torch.equal(before[k], resumed[k]) for k in frozen)
    run_ok(["nnUNetv2_train", "503", CONFIG, "3", "-tr", trainer, "-device", "cpu", "--val"], env)


def _apply_error(workflow: dict, adapter: Path, experts: list[Path], out: Path) -> str:
    proc = run_cli(["pemma", "apply-adapter", "--base", str(workflow["base"]), "--adapter", str(adapter),
                    "--experts", *map(str, experts), "--out", str(out)], workflow["env"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("pemma apply-adapter: error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert not out.exists() and not any(out.parent.glob(f".{out.name}.*"))
    return lines[0]


def test_expert_files_that_do_not_belong_are_refused_and_nothing_is_written(workflow: dict, methods: dict,
                                                                             tmp_path: Path) -> None:
    adapted, continual = methods["moa"]
    adapter = adapted.parent / "adapter_final.safetensors"
    expert = continual.parent / "experts" / "HGJ.safetensors"
    out = tmp_path / "merged"
    assert f"{adapter}: not an expert file" in _apply_error(workflow, adapter, [adapter], out)
    assert f"{expert}: a second file for expert HGJ" in _apply_error(workflow, adapter, [expert, expert], out)
    lora_adapter = workflow["adapted"].parent / "adapter_final.safetensors"
    assert "expert files extend a centre-routed mixture of adapters; this adapter's method is lora" in _apply_error(
        workflow, lora_adapter, [expert], out)


def test_mixture_update_refuses_a_lora_checkpoint(workflow: dict, tmp_path: Path) -> None:
    proc = run_cli(["nnUNetv2_train", "503", CONFIG, "2", "-tr", "PEMMAMoAContinualTrainer", "-device", "cpu",
                    "-pretrained_weights", str(workflow["adapted"])], workflow["env"])
    assert "adapter method lora (checkpoint) vs moa (this network)" in one_line_error(proc)
    folder = workflow["continual"].parent.parent.parent / "PEMMAMoAContinualTrainer__nnUNetPlans__3d_unetr_tiny"
    assert not list(folder.glob("fold_2/*.pth"))
