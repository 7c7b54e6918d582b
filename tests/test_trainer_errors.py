"""Errors a user can act on, from our trainers run by nnU-Net's own `nnUNetv2_train`: one line on stderr and exit
code 2, as the `pemma` command's; bugs keep their traceback, and other programs get the exception itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CONFIG, nnunet_environment, run_cli, run_ok

from nnunetv2_pemma.errors import PlansError

PREFIX = "nnUNetv2_train: error: "


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The message of the one `nnUNetv2_train: error:` line of a command that failed as a user error should."""
    assert proc.returncode == 2, f"exited {proc.returncode}\n{proc.stderr[-5000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-5000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(PREFIX)]
    assert len(errors) == 1, proc.stderr[-5000:]
    return errors[0].removeprefix(PREFIX)


def _run_as_nnunetv2_train(body: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `body` in a process whose main module is nnU-Net's training command, as its console script is (not
    from the repository root, where `-c` would import the source tree instead of the installed package)."""
    script = "from nnunetv2.run.run_training import run_training_entry\n" + body
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=cwd)


TRAINER = """
from nnunetv2_pemma.errors import PlansError
from nnunetv2_pemma.trainers.common import OneLineErrors

class Trainer(OneLineErrors):
    def initialize(self):
        raise {error}
Trainer().initialize()
"""


def test_a_pemma_error_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    proc = _run_as_nnunetv2_train(TRAINER.format(error='PlansError("configuration X holds no PEMMA preset")'),
                                  tmp_path)
    assert proc.stderr == PREFIX + "configuration X holds no PEMMA preset\n"
    assert proc.returncode == 2


def test_a_bug_keeps_its_traceback(tmp_path: Path) -> None:
    proc = _run_as_nnunetv2_train(TRAINER.format(error='KeyError("plans")'), tmp_path)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "KeyError: 'plans'" in proc.stderr
    assert PREFIX not in proc.stderr


@pytest.mark.slow
def test_outside_nnunetv2_train_the_error_propagates(own_workflow: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process (benchmarks, tests) a trainer raises its PemmaError instead of exiting."""
    from nnunetv2.run.run_training import get_trainer_from_args

    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        monkeypatch.setenv(name, own_workflow["env"][name])
    with pytest.raises(PlansError, match="SwinUNETRTrainer trains a SwinUNETR"):
        get_trainer_from_args("501", CONFIG, 0, "SwinUNETRTrainer", device=torch.device("cpu"))



@pytest.fixture(scope="module")
def three_cases(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A dataset of 3 training cases (one centre), planned and given the tiny preset: the converter writes no
    splits_final.json for fewer than 5 cases."""
    root = tmp_path_factory.mktemp("three_cases")
    env = nnunet_environment(root)
    run_ok(["pemma", "phantom", str(root / "hecktor"), "--cases-per-center", "3", "--seed", "5"], env)
    run_ok(["pemma", "convert-hecktor", str(root / "hecktor"), "--dataset-id", "511", "--name", "ThreeCases",
            "--centers", "CHUM", "--modalities", "CT"], env)
    run_ok(["nnUNetv2_plan_and_preprocess", "-d", "511", "-c", "3d_fullres", "-np", "1", "-npfp", "1"], env)
    run_ok(["pemma", "plans", "add", "511", "--preset", "tiny"], env)
    return {"env": env, "preprocessed": Path(env["nnUNet_preprocessed"]) / "Dataset511_ThreeCases"}


@pytest.mark.slow
def test_fewer_than_five_cases_say_to_train_fold_all(three_cases: dict) -> None:
    assert not (three_cases["preprocessed"] / "splits_final.json").exists()
    proc = run_cli(["nnUNetv2_train", "511", CONFIG, "0", "-tr", "UNETRTrainer", "-device", "cpu"],
                   three_cases["env"])
    message = one_line_error(proc)
    assert message.startswith("Dataset511_ThreeCases has 3 training case(s), too few for nnU-Net's 5-fold "
                              "cross-validation")
    assert f"nnUNetv2_train Dataset511_ThreeCases {CONFIG} all -tr UNETRTrainer ..." in message
    assert message.endswith("or add cases")
    assert not (three_cases["preprocessed"] / "splits_final.json").exists()


@pytest.mark.slow
def test_fold_all_trains_on_fewer_than_five_cases(three_cases: dict) -> None:
    """What the error above advises works."""
    run_ok(["nnUNetv2_train", "511", CONFIG, "all", "-tr", "UNETRTrainer", "-device", "cpu"], three_cases["env"])
    model = (Path(three_cases["env"]["nnUNet_results"]) / "Dataset511_ThreeCases"
             / f"UNETRTrainer__nnUNetPlans__{CONFIG}" / "fold_all")
    assert (model / "checkpoint_final.pth").is_file()
