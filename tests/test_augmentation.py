"""The preset's data_augmentation section: which of nnU-Net's own training transforms run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from conftest import CONFIG, REPO, run_ok
from nnunetv2_pemma.errors import PlansError
from nnunetv2_pemma.plans import load_preset
from nnunetv2_pemma.training.augmentation import GROUPS, AugmentationChoice, select_transforms


def nnunet_pipeline():
    """nnU-Net's own training pipeline for a 3-D patch with mirroring on all axes."""
    return nnUNetTrainer.get_training_transforms(np.array([32, 32, 32]), (-0.5, 0.5), None, (0, 1, 2), False,
                                                 use_mask_for_norm=[False], foreground_labels=[1, 2])


def kinds(pipeline) -> set[type]:
    return {type(t.transform if isinstance(t, RandomTransform) else t) for t in pipeline.transforms}


def test_default_keeps_nnunets_pipeline() -> None:
    full = nnunet_pipeline()
    kept = select_transforms(full, AugmentationChoice())
    assert [type(t) for t in kept.transforms] == [type(t) for t in full.transforms]


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_each_group_can_be_turned_off(group: str) -> None:
    full = nnunet_pipeline()
    kept = select_transforms(full, AugmentationChoice.parse({group: False}))
    present = kinds(full)
    assert present & set(GROUPS[group]), f"nnU-Net's pipeline has no {group} transform to drop"
    assert kinds(kept) == present - set(GROUPS[group])


def test_mirror_only() -> None:
    choice = AugmentationChoice.parse({"spatial": False, "intensity": False})
    kept = kinds(select_transforms(nnunet_pipeline(), choice))
    assert MirrorTransform in kept and SpatialTransform not in kept
    assert not kept & set(GROUPS["intensity"])


@pytest.mark.parametrize("section", [{"elastic": False}, {"spatial": "no"}, ["spatial"]])
def test_bad_section_names_the_preset(tmp_path: Path, section) -> None:
    preset = json.loads((REPO / "plans" / "tiny.json").read_text()) | {"data_augmentation": section}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(preset))
    with pytest.raises(PlansError, match=rf"preset {path}: 'data_augmentation' must map"):
        load_preset(str(path))


@pytest.mark.slow
def test_choice_reaches_nnunets_dataloader(own_workflow: dict, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Through nnU-Net's own trainer set-up: the preset's choice decides the dataloader's transforms and patch
    size; a configuration without the section gets nnU-Net's full pipeline and enlarged sampling patch."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    env = own_workflow["env"]
    preset = json.loads((REPO / "plans" / "tiny.json").read_text())
    preset |= {"configuration": "3d_unetr_tiny_mirror", "data_augmentation": {"spatial": False, "intensity": False}}
    path = tmp_path / "tiny_mirror.json"
    path.write_text(json.dumps(preset))
    run_ok(["pemma", "plans", "add", "501", "--preset", str(path)], env)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA", "nnUNet_extTrainer"):
        monkeypatch.setenv(name, env[name])

    def loader(configuration: str):
        trainer = get_trainer_from_args("501", configuration, 0, "UNETRTrainer", device=torch.device("cpu"))
        trainer.initialize()
        train_loader, _ = trainer.get_dataloaders()
        return train_loader.data_loader, next(train_loader)

    chosen, batch = loader("3d_unetr_tiny_mirror")
    assert kinds(chosen.transforms) >= {MirrorTransform} and SpatialTransform not in kinds(chosen.transforms)
    assert list(chosen.patch_size) == preset["patch_size"] == list(batch["data"].shape[2:])
    full, batch = loader(CONFIG)
    assert SpatialTransform in kinds(full.transforms) and kinds(full.transforms) & set(GROUPS["intensity"])
    assert all(a > b for a, b in zip(full.patch_size, preset["patch_size"])), "nnU-Net samples a larger patch"
    assert list(batch["data"].shape[2:]) == preset["patch_size"]
