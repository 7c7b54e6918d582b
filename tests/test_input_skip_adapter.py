"""The input-skip adapter (`adaptation.input_skip_adapter`): conv LoRA on the CT input skip's convolutions of both
backbones, a no-op until trained, trained only in continual updates, switched off and folded like the qkv LoRA."""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from conftest import CONFIG, checkpoint_of, nnunet_environment, run_ok, weights
from networks_helpers import Tiny, perturb
from nnunetv2_pemma.adaptation.conv_layers import LoRAConv3d
from nnunetv2_pemma.adaptation.folding import fold_adapters
from nnunetv2_pemma.adaptation.layers import set_adapters_enabled
from nnunetv2_pemma.adaptation.methods import added_by, train_only
from nnunetv2_pemma.config import Adaptation
from nnunetv2_pemma.plans import load_preset

BACKBONES = ["UNETR", "SwinUNETR"]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_wraps_the_ct_input_skip_only_and_starts_as_the_model_without(backbone: str) -> None:
    tiny = Tiny.of(backbone)
    base = tiny.base()
    plain, skip = tiny.adapted(base), tiny.adapted(base, input_skip_adapter=True)
    wrapped = [n for n, m in skip.named_modules() if isinstance(m, LoRAConv3d)]
    assert wrapped and all(n.startswith("encoder1.") for n in wrapped), wrapped
    assert not any(isinstance(m, LoRAConv3d) for m in skip.pet_encoder1.modules()), "PET's skip keeps its own"
    added = {k for k in skip.state_dict() if k not in plain.state_dict()}
    assert added and {added_by(k) for k in added} == {"conv_lora_"}
    assert torch.equal(skip.pet_encoder1.layer.conv1.conv.weight, skip.encoder1.layer.conv1.conv.weight), \
        "cross initialisation still copies the CT skip's base weights into PET's"
    perturb(plain, "lora_", "pet_")
    skip.load_state_dict(plain.state_dict(), strict=False)
    x = tiny.image(2)
    with torch.no_grad():
        torch.testing.assert_close(skip(x), plain(x))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_trains_in_continual_updates_only(backbone: str) -> None:
    net = Tiny.of(backbone).pemma(input_skip_adapter=True)
    adapting = {added_by(n) for n in train_only(net, "adaptation")}
    assert "conv_lora_" not in adapting and "lora_" in adapting
    continual = {added_by(n) for n in train_only(net, "continual")}
    assert continual == {"lora_", "conv_lora_"}


def test_off_and_folded() -> None:
    tiny = Tiny.of("UNETR")
    base = tiny.base()
    net = tiny.adapted(base, input_skip_adapter=True)
    perturb(net, "conv_lora_", "lora_B")
    ct = tiny.image(1)
    with torch.no_grad():
        adapted = net(torch.cat([ct, torch.zeros_like(ct)], dim=1))
        folded = fold_adapters(copy.deepcopy(net))
        assert not any("lora" in k for k in folded.state_dict())
        torch.testing.assert_close(folded(torch.cat([ct, torch.zeros_like(ct)], dim=1)), adapted,
                                   atol=1e-4, rtol=1e-4)
        net.set_input_modalities(("CT",))
        net.adaptation = dataclasses.replace(net.adaptation, missing_modality="drop")
        set_adapters_enabled(net, False)
        torch.testing.assert_close(net(ct), base(ct)), "adapters off, CT alone: the CT base"


def test_preset_option_is_checked() -> None:
    section = load_preset("demo").adaptation.to_json()
    assert Adaptation.parse({**section, "input_skip_adapter": True}).input_skip_adapter is True
    assert Adaptation.parse(section).input_skip_adapter is False
    with pytest.raises(ValueError, match="input_skip_adapter must be true or false"):
        Adaptation.parse({**section, "input_skip_adapter": "yes"})


DATASET = "Dataset503_HNC_CT_HGJ"


@pytest.mark.slow
def test_input_skip_update_through_nnunet(workflow: dict, tmp_path: Path) -> None:
    """PEMMAContinualTrainer_inputSkip on the shared workflow's PEMMA model (HGJ, CT only), in private nnU-Net
    folders: the base and the PET modules stay bit-identical, LoRA and the new input-skip adapter train, the adapter
    file carries it, a later plain continual update keeps it, and `pemma predict` runs the model with CT alone."""
    env = nnunet_environment(tmp_path)
    for folder in ("nnUNet_raw", "nnUNet_preprocessed"):
        shutil.copytree(Path(workflow["env"][folder]) / DATASET, Path(env[folder]) / DATASET)
    run_ok(["nnUNetv2_train", "503", CONFIG, "0", "-tr", "PEMMAContinualTrainer_inputSkip", "-device", "cpu",
            "-pretrained_weights", str(workflow["adapted"])], env)
    first = checkpoint_of(env, DATASET, "PEMMAContinualTrainer_inputSkip")
    adapted, updated = weights(workflow["adapted"]), weights(first)
    added = set(updated) - set(adapted)
    assert added and {added_by(k) for k in added} == {"conv_lora_"}
    assert all(k.startswith("encoder1.") for k in added)
    assert any(updated[k].abs().sum() > 0 for k in added if k.endswith("conv_lora_B")), "the adapter did not train"
    changed = {added_by(k) for k in adapted if not torch.equal(adapted[k], updated[k])}
    assert changed == {"lora_"}, changed  # base and PET modules untouched
    from safetensors.torch import load_file

    assert added <= set(load_file(str(first.parent / "adapter_final.safetensors")))
    # a later update with the plain continual trainer keeps (and trains) the adapter
    run_ok(["nnUNetv2_train", "503", CONFIG, "1", "-tr", "PEMMAContinualTrainer", "-device", "cpu",
            "-pretrained_weights", str(first)], env)
    second = weights(first.parent.parent.parent / f"PEMMAContinualTrainer__nnUNetPlans__{CONFIG}" / "fold_1"
                     / "checkpoint_final.pth")
    assert added <= set(second) and any(not torch.equal(second[k], updated[k]) for k in added)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    case = sorted((Path(env["nnUNet_raw"]) / DATASET / "imagesTs").glob("*_0000.nii.gz"))[0]
    shutil.copy(case, inputs / case.name)
    run_ok(["pemma", "predict", "-np", "0", "-i", str(inputs), "-o", str(tmp_path / "out"), "-d", "503", "-c", CONFIG,
            "-tr", "PEMMAContinualTrainer_inputSkip", "-f", "0", "-device", "cpu", "--modalities", "CT"], env)
    assert (tmp_path / "out" / case.name.replace("_0000", "")).is_file()
