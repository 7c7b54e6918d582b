"""benchmarks/gpu_check.sh, the prepared device check, run on the CPU at the tiny preset: its results file names the
device and holds what speed_memory.py measured, its short trainings leave a CT base and a PEMMA model that adapts
it, and its three predictions have the CT image's size."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from conftest import WARM_COMMANDS, nnunet_environment

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
SETUPS = ("ct_unetr", "pemma_adaptation")
"""speed_memory setups of the CPU run (the GPU run measures all of them): the two the short trainings train."""
CONFIG = "3d_unetr_tiny"


def script_environment(root: Path) -> dict[str, str]:
    """The test suite's environment for nnU-Net commands (conftest), with this venv's commands first on PATH; the
    script points nnU-Net at its own folders."""
    env = nnunet_environment(root)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def run_script(args: list[str], root: Path, timeout: float = 1800) -> subprocess.CompletedProcess:
    """The script with its nnU-Net and pemma commands forked from the suite's warm process (conftest)."""
    argv, env = WARM_COMMANDS.with_warm_children(["bash", str(SCRIPT), *args], script_environment(root))
    return subprocess.run(argv, env=env, cwd=root, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def check(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One CPU run of the script at the tiny preset, shared by the tests below."""
    root = tmp_path_factory.mktemp("gpu_check")
    out = root / "out"
    proc = run_script(["--device", "cpu", "--preset", "tiny", "--out", str(out), "--setups", ",".join(SETUPS)], root)
    assert proc.returncode == 0, (f"gpu_check.sh exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}"
                                  f"\n--- stderr ---\n{proc.stderr[-6000:]}")
    return {"out": out, "stdout": proc.stdout, "results": nnunet_results(out)}


def nnunet_results(out: Path) -> Path:
    return out / "nnUNet_data" / "nnUNet_results"


def row_numbers(markdown: str, label: str) -> list[str]:
    """The cells of the table row whose first cell is `label`."""
    rows = [line for line in markdown.splitlines() if line.startswith(f"| {label} |")]
    assert len(rows) == 1, f"{len(rows)} rows for {label!r} in the results file"
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


@pytest.mark.slow
def test_results_file_names_the_cpu_and_every_measured_method(check: dict) -> None:
    out = check["out"]
    results = out / "gpu_check.md"
    assert check["stdout"].strip().splitlines()[-1] == str(results)  # the script ends with the results file's path
    text = results.read_text()
    heading = text.splitlines()[0]
    assert heading.startswith("## Device check on CPU:") and "`tiny`" in heading
    assert f"torch {torch.__version__}" in text and "nnunetv2 " in text

    speed = json.loads((out / "speed_memory.json").read_text())
    assert set(speed["train"]) == set(SETUPS)
    for setup, train in speed["train"].items():
        cells = row_numbers(text, train["label"])
        step_ms, memory_mib = float(cells[3].replace(",", "")), float(cells[4].replace(",", ""))
        assert step_ms > 0 and memory_mib > 0
        assert step_ms == pytest.approx(1000 * train["step_s_median"], abs=0.051)
        assert memory_mib == pytest.approx(speed["memory"][setup]["tensor_peak_bytes"] / 2**20, abs=0.051)

    report = json.loads((out / "gpu_check.json").read_text())
    assert report["device"] == "CPU" and report["ok"] is True
    assert [m["setup"] for m in report["speed_memory"]["methods"]] == list(speed["train"])
    for stage in ("train_ct_base", "train_pemma", "predict_ctpet", "predict_ct", "predict_pet"):
        wall = report["stages"][stage]["wall_s"]
        assert report["stages"][stage]["exit_code"] == 0 and wall > 0
        assert re.search(rf"\| {re.escape(format(wall, ',.1f'))} \| ok \|", text), f"no wall time row for {stage}"


@pytest.mark.slow
def test_short_trainings_give_a_ct_base_and_a_pemma_model_of_it(check: dict) -> None:
    results = check["results"]
    base_file = results / "Dataset501_CT" / f"UNETRTrainer__nnUNetPlans__{CONFIG}" / "fold_0" / "checkpoint_final.pth"
    pemma_file = results / "Dataset502_CTPET" / f"PEMMATrainer__nnUNetPlans__{CONFIG}" / "fold_all" / \
        "checkpoint_final.pth"
    base = torch.load(base_file, map_location="cpu", weights_only=False)
    pemma = torch.load(pemma_file, map_location="cpu", weights_only=False)
    for checkpoint in (base, pemma):  # the short schedule (10 iterations, 5 per epoch) was the one trained
        assert checkpoint["current_epoch"] == 2
    base_weights, pemma_weights = base["network_weights"], pemma["network_weights"]
    assert any("lora" in k.lower() for k in pemma_weights)
    assert base_weights.keys() <= pemma_weights.keys()
    changed = [k for k in base_weights if not torch.equal(pemma_weights[k], base_weights[k])]
    assert not changed, f"PEMMA changed CT-base tensors: {changed[:5]}"


@pytest.mark.slow
def test_three_predictions_have_the_ct_size(check: dict) -> None:
    out = check["out"]
    raw = out / "nnUNet_data" / "nnUNet_raw" / "Dataset502_CTPET" / "imagesTs"
    (ct,) = sorted(raw.glob("*_0000.nii.gz"))
    case = ct.name[:-len("_0000.nii.gz")]
    ct_size = sitk.ReadImage(str(ct)).GetSize()
    for folder in ("ctpet", "ct", "pet"):
        mask = sitk.ReadImage(str(out / "predictions" / folder / f"{case}.nii.gz"))
        assert mask.GetSize() == ct_size, folder
        assert sitk.GetArrayViewFromImage(mask).max() <= 2  # labels: background, GTVp, GTVn


@pytest.mark.parametrize("args", [["--bogus"], ["--device", "gpu"], ["--preset", "paper", "--out"]])
def test_bad_option_is_a_one_line_usage_error(args: list[str], tmp_path: Path) -> None:
    proc = run_script([*args, "--out", str(tmp_path / "out")] if "--out" not in args else args, tmp_path,
                      timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "usage: bash benchmarks/gpu_check.sh" in lines[0] and "error" in lines[0]
    assert proc.stdout == "" and not (tmp_path / "out").exists()


def test_a_spent_budget_skips_the_stages_and_still_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_script(["--device", "cpu", "--preset", "tiny", "--out", str(out), "--budget", "10"], tmp_path,
                      timeout=300)
    assert proc.returncode == 1
    assert proc.stdout.strip().splitlines()[-1] == str(out / "gpu_check.md")
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["ok"] is False and report["speed_memory"] is None
    assert {s["exit_code"] for s in report["stages"].values()} == {-1}
    assert all(t["status"] == "not run" and t["checkpoint"] is None for t in report["trainings"].values())
    text = (out / "gpu_check.md").read_text()
    assert text.startswith("## Device check on CPU:") and "**some stages failed**" in text
    assert not (out / "nnUNet_data" / "nnUNet_raw" / "Dataset501_CT").exists()
    again = run_script(["--device", "cpu", "--preset", "tiny", "--out", str(out)], tmp_path, timeout=60)
    assert again.returncode == 2 and "holds an earlier run" in again.stderr  # a folder is never run into twice
