"""The suite's warm runner of nnU-Net's commands (warm_commands.py) against the same commands run as plain processes:
the same output and exit code, and a command past its timeout killed with the server still serving; likewise the
commands that processes of its warm venv start (`pemma reproduce`'s jobs), which a signal ends and which run plain
when the server is gone. (That this package's trainers see nnUNetv2_train in the forked child is what
test_trainer_errors and every other one-line refusal under nnUNetv2_train check when tests run side by side.)"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
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


def client_run(python: str, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """ARGV as a process started by PYTHON starts it: the command of that name beside the interpreter."""
    script = ("import subprocess, sys; from pathlib import Path; "
              f"sys.exit(subprocess.run([str(Path(sys.executable).parent / {argv[0]!r}), *{argv[1:]!r}]).returncode)")
    return subprocess.run([python, "-c", script], env=env, capture_output=True, text=True, timeout=300)


def imported_modules(stderr: str) -> set[str]:
    """The modules that PYTHONPROFILEIMPORTTIME listed (read by an interpreter when it starts, so a forked
    child lists none)."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("argv", [["nnUNetv2_train", "999", "3d_fullres", "0"],
                                  ["pemma", "plans", "add", "999", "--preset", "tiny"]],
                         ids=["nnU-Net", "pemma"])
def test_processes_of_the_warm_venv_find_forked_commands(warm: WarmCommands, tmp_path: Path,
                                                         argv: list[str]) -> None:
    """What a process of the warm venv finds beside its interpreter (as `pemma reproduce` and the benchmarks
    find their jobs' commands) gives the plain command's output and exit code, without importing torch again."""
    env = {**environment(tmp_path), "PYTHONPROFILEIMPORTTIME": "1"}
    python = warm.python
    assert python != sys.executable, "the warm venv was not written"
    ours, theirs = client_run(python, argv, env), _plain(argv, env, 300)
    assert ours.returncode == theirs.returncode != 0
    assert ours.stdout == theirs.stdout
    messages = [[line for line in p.stderr.splitlines() if not line.startswith("import time:")] for p in (ours, theirs)]
    assert messages[0][-1:] == messages[1][-1:]
    assert "torch" in imported_modules(theirs.stderr) and "torch" not in imported_modules(ours.stderr)


def descendants(pid: int) -> set[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def test_a_signal_to_a_warm_venv_command_ends_what_it_runs(warm: WarmCommands, tmp_path: Path) -> None:
    env = environment(tmp_path)
    dataset = tmp_path / "raw" / "Dataset999_Blocked"
    dataset.mkdir()
    os.mkfifo(dataset / "dataset.json")  # nobody writes it: the fingerprint extraction waits for ever
    warm.python  # the server runs
    client = subprocess.Popen([str(Path(warm.python).parent / "nnUNetv2_plan_and_preprocess"), "-d", "999", "-np",
                               "1", "-npfp", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(descendants(warm._server.pid)) < 2:  # the server's child waits for the command it forked
        assert time.monotonic() < deadline and client.poll() is None, "the command did not start in the server"
        time.sleep(0.2)
    client.send_signal(signal.SIGTERM)
    assert client.wait(timeout=60) == -signal.SIGTERM
    deadline = time.monotonic() + 30
    while descendants(warm._server.pid):
        assert time.monotonic() < deadline, "the command outlived the signal"
        time.sleep(0.2)


def test_without_the_server_the_warm_venv_runs_plain_commands(tmp_path: Path) -> None:
    env = {**environment(tmp_path), "PYTHONPROFILEIMPORTTIME": "1"}
    stopped = WarmCommands(enabled=True)
    python = stopped.python
    stopped._server.kill()
    stopped._server.wait()
    done = client_run(python, ["nnUNetv2_train", "999", "3d_fullres", "0"], env)
    assert done.returncode != 0 and "torch" in imported_modules(done.stderr)
