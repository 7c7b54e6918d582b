"""The suite's warm runner of nnU-Net's commands (warm_commands.py) against the same commands run as plain processes:
the same output and exit code, and a command past its timeout killed with the server still serving. (That this
package's trainers see nnUNetv2_train in the forked child is what test_trainer_errors and every other one-line
refusal under nnUNetv2_train check when tests run side by side.)"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from warm_commands import WarmCommands, _plain


@pytest.fixture(scope="module")
def warm() -> WarmCommands:
    return WarmCommands(enabled=True)


def environment(folder: Path) -> dict[str, str]:
    """Empty nnU-Net folders, one thread (the runner's condition)."""
    for name in ("raw", "preprocessed", "results"):
        (folder / name).mkdir(exist_ok=True)
    return {**os.environ, "OMP_NUM_THREADS": "1", "nnUNet_raw": str(folder / "raw"),
            "nnUNet_preprocessed": str(folder / "preprocessed"), "nnUNet_results": str(folder / "results")}


@pytest.mark.parametrize("argv", [["nnUNetv2_predict", "-h"], ["nnUNetv2_train"],
                                  ["nnUNetv2_train", "999", "3d_fullres", "0"],
                                  ["nnUNetv2_plan_and_preprocess", "-d", "999", "-np", "1", "-npfp", "1"]],
                         ids=["help", "usage error", "no dataset", "no raw dataset"])
def test_output_and_exit_code_are_the_plain_commands(warm: WarmCommands, tmp_path: Path, argv: list[str]) -> None:
    env = environment(tmp_path)
    ours, theirs = warm.run(argv, env, 300), _plain(argv, env, 300)
    assert warm._server is not None, "the warm server did not start (a plain process ran instead)"
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout)
    assert ours.stderr.splitlines()[-1:] == theirs.stderr.splitlines()[-1:]  # the message or traceback's last line
    assert ours.returncode != 0 or argv[-1] == "-h"


def test_the_working_directory_does_not_shadow_installed_packages(warm: WarmCommands, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Started in a folder that holds a package of the same name (a source checkout), the command imports the
    installed one, as its console script does: here the trainer search imports this package's trainers."""
    from nnunetv2_pemma.environment import trainer_folder

    shadow = tmp_path / "checkout"
    (shadow / "nnunetv2_pemma").mkdir(parents=True)
    (shadow / "nnunetv2_pemma" / "__init__.py").write_text("raise ImportError('the checkout, not the install')\n")
    monkeypatch.chdir(shadow)
    env = {**environment(tmp_path), "nnUNet_extTrainer": str(trainer_folder())}
    argv = ["nnUNetv2_train", "999", "3d_fullres", "0", "-tr", "PEMMATrainer", "-device", "cpu"]
    ours, theirs = warm.run(argv, env, 300), _plain(argv, env, 300)
    assert "the checkout" not in ours.stderr
    assert (ours.returncode, ours.stderr.splitlines()[-1:]) == (theirs.returncode, theirs.stderr.splitlines()[-1:])


def test_a_command_past_its_timeout_is_killed(warm: WarmCommands, tmp_path: Path) -> None:
    env = environment(tmp_path)
    dataset = tmp_path / "raw" / "Dataset999_Blocked"
    dataset.mkdir()
    os.mkfifo(dataset / "dataset.json")  # nobody writes it: the fingerprint extraction waits for ever
    with pytest.raises(subprocess.TimeoutExpired):
        warm.run(["nnUNetv2_plan_and_preprocess", "-d", "999", "-np", "1", "-npfp", "1"], env, 15)
    assert warm.run(["nnUNetv2_predict", "-h"], env, 120).returncode == 0  # the server still serves


def test_a_disabled_runner_runs_plain_processes(tmp_path: Path) -> None:
    plain = WarmCommands(enabled=False)
    assert plain.run(["nnUNetv2_predict", "-h"], environment(tmp_path), 120).returncode == 0
    assert plain._server is None
