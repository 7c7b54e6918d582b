"""What an install must give: the trainers and presets inside the package (a wheel carries them), nnU-Net finding
every trainer through `pemma env`'s nnUNet_extTrainer, torchvision and timm importable (nnU-Net imports them during
every trainer lookup), and `pemma --help` listing the subcommands."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO, run_ok

from nnunetv2_pemma.environment import preset_folder, trainer_folder


def _trainer_classes() -> list[str]:
    """Every nnU-Net trainer class defined in the repository's trainers/ folder (mixins left out)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    names = []
    for path in sorted((REPO / "trainers").rglob("*.py")):
        module = importlib.import_module(".".join(("nnunetv2_pemma", *path.relative_to(REPO).with_suffix("").parts)))
        names += [n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)
                  and issubclass(getattr(module, n.name), nnUNetTrainer)]
    return names


def test_nnunet_finds_every_trainer(tmp_path: Path) -> None:
    trainers = _trainer_classes()
    assert len(trainers) >= 17, trainers
    exports = run_ok(["pemma", "env", "--root", str(tmp_path / "data")], dict(os.environ)).stdout
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    for line in exports.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value.strip("'")
    assert env["nnUNet_extTrainer"] == str(trainer_folder()) and env["nnUNet_raw"] == str(tmp_path / "data" /
                                                                                          "nnUNet_raw")
    script = ("import timm, torchvision\n"
              "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
              f"for name in {trainers!r}:\n"
              "    cls = find(name)\n"
              "    assert cls.__name__ == name, cls\n"
              "    print('found', name)\n")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("found ")]
    assert found == trainers, proc.stdout


def test_trainers_and_presets_are_installed_inside_the_package() -> None:
    assert (preset_folder() / "tiny.json").is_file() and (preset_folder() / "paper.json").is_file()
    assert (trainer_folder() / "adaptation" / "pemma.py").is_file()


def test_the_wheel_carries_trainers_and_presets(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = next(tmp_path.glob("nnunetv2_pemma-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = {p.name for p in (REPO / "plans").glob("*.json")}
    assert presets and {f"nnunetv2_pemma/presets/{p}" for p in presets} <= names, sorted(names)
    sources = {str(p.relative_to(REPO / "trainers")) for p in (REPO / "trainers").rglob("*.py")}
    assert {f"nnunetv2_pemma/trainers/{s}" for s in sources} <= names, sorted(names)
    library = {str(p.relative_to(REPO)) for p in (REPO / "nnunetv2_pemma").rglob("*.py")}
    assert library <= names, sorted(library - names)
    assert "nnunetv2_pemma/experiments/seed_spread.json" in names, "the claims' seed spreads"


def test_pemma_help_lists_the_subcommands(nnunet_env: dict[str, str]) -> None:
    out = run_ok(["pemma", "--help"], nnunet_env).stdout
    for command in ("demo", "env", "reproduce", "phantom", "convert-hecktor", "plans", "predict",
                    "predict-late-fusion", "apply-adapter", "evaluate", "parameters"):
        assert command in out


def test_the_command_line_starts_without_torch(tmp_path: Path) -> None:
    """Building `pemma`'s parser imports no torch, MONAI or nnU-Net: every `pemma` call (the reproduction runs
    dozens) would pay seconds for them."""
    probe = ("import sys\nfrom nnunetv2_pemma.cli import build_parser\nbuild_parser()\n"
             "print(sorted(m for m in ('torch', 'monai', 'nnunetv2') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"
