"""Where the installed trainers and presets are, and the environment nnU-Net's commands need.

The repository's `trainers/` and `plans/` folders are installed inside the package (setup.py), so these paths
hold for a wheel, `pip install .` and an editable install alike.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
from pathlib import Path

NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def _package_folder(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations, f"{package} is not installed"
    return Path(next(iter(spec.submodule_search_locations)))


def trainer_folder() -> Path:
    """The folder nnU-Net must search for this package's trainers (`nnUNet_extTrainer`)."""
    return _package_folder("nnunetv2_pemma.trainers")


def preset_folder() -> Path:
    """The folder of the JSON presets (`plans/` in the repository)."""
    return _package_folder("nnunetv2_pemma.presets")


def nnunet_variables(data_root: Path) -> dict[str, str]:
    """nnU-Net's three folders under `data_root` and the trainer search path, as environment variables."""
    root = data_root.resolve()
    variables = {name: str(root / name) for name in NNUNET_FOLDERS}
    variables["nnUNet_extTrainer"] = os.pathsep.join(
        dict.fromkeys([str(trainer_folder())] + [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep)
                                                  if p.strip()]))
    return variables


def export_lines(data_root: Path) -> str:
    """`export` lines for a POSIX shell: `eval "$(pemma env --root DIR)"`."""
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in nnunet_variables(data_root).items())
