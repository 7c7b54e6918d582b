"""The benchmarking trainers (nnunetv2_pemma.trainers.benchmarking) train what benchmarks/speed_memory.py says
they train, through nnU-Net's own train_step, and the benchmark's tiny run writes its JSON and Markdown."""

from __future__ import annotations

import json

import pytest
import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from conftest import REPO, nnunet_environment, run_ok
from nnunetv2_pemma.trainers.benchmarking.step_timing import (EarlyFusionTrainer_stepTiming,
                                                               PEMMACNNTrainer_stepTiming,
                                                               PEMMAContinualTrainer_stepTiming,
                                                               PEMMATrainer_stepTiming, StepTiming,
                                                               UNETRTrainer_stepTiming, nnUNetTrainer_stepTiming)

pytestmark = pytest.mark.slow
SETUPS = ("ct_unetr", "pemma_adaptation", "pemma_prior", "pemma_moa", "pemma_continual", "early_fusion", "unet",
          "unet_channel_dropout", "early_fusion_cnn", "pemma_cnn", "h2aseg", "slices25d")
"""The setups the test runs (speed_memory.py has DoRA and prior tokens too, which differ from these in one layer)."""


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One short tiny run of the benchmark (its nnU-Net folders kept), shared by the tests below."""
    root = tmp_path_factory.mktemp("bench")
    env = nnunet_environment(root)
    env.pop("nnUNet_n_proc_DA")  # nnUNetv2_plan_and_preprocess hands it to torch.set_num_threads, which rejects 0
    proc = run_ok(["python", str(REPO / "benchmarks" / "speed_memory.py"), "--preset", "tiny", "--device", "cpu",
                   "--steps", "2", "--warmup", "0", "--cases", "1", "--no-memory", "--workspace", str(root),
                   "--setups", *SETUPS,
                   "--json", str(root / "out.json"), "--markdown", str(root / "out.md")], env, warm_children=True)
    return {"root": root, "stdout": proc.stdout, "workspace": json.loads((root / "workspace.json").read_text())}


@pytest.fixture
def ws(bench: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    """The benchmark's workspace, with nnU-Net pointed at it in this process."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, str(bench["root"] / name))
    monkeypatch.setenv("nnUNet_compile", "false")
    return bench["workspace"]


def steps_through_nnunet(trainer: StepTiming, monkeypatch: pytest.MonkeyPatch, steps: int = 2) -> None:
    """Run `steps` timed steps and check that each went through nnUNetTrainer.train_step."""
    calls = []
    original = nnUNetTrainer.train_step

    def counted(self, batch):
        calls.append(batch is self.batch)
        return original(self, batch)

    monkeypatch.setattr(nnUNetTrainer, "train_step", counted)
    for _ in range(steps):
        assert torch.isfinite(torch.as_tensor(trainer.timed_step()["loss"]))
    assert calls == [True] * steps


def ct_base(ws: dict) -> dict[str, torch.Tensor]:
    return torch.load(ws["ct_base"], map_location="cpu", weights_only=False)["network_weights"]


def test_pemma_adaptation_leaves_the_ct_base_frozen(ws: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = PEMMATrainer_stepTiming.started(ws["ctpet"], ws["unetr_configuration"], "cpu", ws["ct_base"])
    base = ct_base(ws)
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    assert trainer.batch["data"].shape[1] == 2 and base.keys() <= before.keys()
    assert all(torch.equal(before[k], base[k]) for k in base)  # started from the CT base
    steps_through_nnunet(trainer, monkeypatch)
    after = trainer.network.state_dict()
    assert all(torch.equal(after[k], base[k]) for k in base), "a CT base weight changed"
    assert any(not torch.equal(after[k], before[k]) for k in after.keys() - base.keys()), "nothing trained"
    trainable = sum(p.numel() for p in trainer.network.parameters() if p.requires_grad)
    assert 0 < trainable < 0.5 * sum(p.numel() for p in trainer.network.parameters())


def test_pemma_on_the_cnn_leaves_its_ct_model_frozen(ws: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = PEMMACNNTrainer_stepTiming.started(ws["ctpet"], ws["cnn_configuration"], "cpu", ws["cnn_base"])
    base = torch.load(ws["cnn_base"], map_location="cpu", weights_only=False)["network_weights"]
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    assert trainer.batch["data"].shape[1] == 2 and base.keys() <= before.keys()
    assert all(torch.equal(before[k], base[k]) for k in base)  # the whole CT model, segmentation heads included
    steps_through_nnunet(trainer, monkeypatch)
    after = trainer.network.state_dict()
    assert all(torch.equal(after[k], base[k]) for k in base), "a weight of the CT model changed"
    assert any(not torch.equal(after[k], before[k]) for k in after.keys() - base.keys()), "nothing trained"
    assert isinstance(trainer.loss, DeepSupervisionWrapper) and isinstance(trainer.optimizer, torch.optim.SGD)


def test_early_fusion_trains_the_ct_base(ws: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = EarlyFusionTrainer_stepTiming.started(ws["ctpet"], ws["unetr_configuration"], "cpu", ws["ct_base"])
    base = ct_base(ws)
    params = dict(trainer.network.named_parameters())
    shared = [k for k in base if k in params and params[k].requires_grad and params[k].shape == base[k].shape]
    assert len(shared) > 100 and all(torch.equal(params[k].detach(), base[k]) for k in shared)
    steps_through_nnunet(trainer, monkeypatch)
    assert all(not torch.equal(params[k].detach(), base[k]) for k in shared), "a CT base weight did not train"


def test_pemma_continual_trains_only_what_adaptation_left_trainable(ws: dict, monkeypatch: pytest.MonkeyPatch
                                                                      ) -> None:
    pemma = torch.load(ws["pemma"], map_location="cpu", weights_only=False)["network_weights"]
    trainer = PEMMAContinualTrainer_stepTiming.started(ws["ct"], ws["unetr_configuration"], "cpu", ws["pemma"])
    assert trainer.batch["data"].shape[1] == 1
    steps_through_nnunet(trainer, monkeypatch)
    params = dict(trainer.network.named_parameters())
    changed = {k for k, v in trainer.network.state_dict().items() if not torch.equal(v, pemma[k])}
    assert changed and all(k in params and params[k].requires_grad for k in changed)
    adaptation = PEMMATrainer_stepTiming.started(ws["ctpet"], ws["unetr_configuration"], "cpu", ws["ct_base"])
    count = lambda t: sum(p.numel() for p in t.network.parameters() if p.requires_grad)  # noqa: E731
    assert 0 < count(trainer) < count(adaptation)


@pytest.mark.parametrize("trainer_class", [UNETRTrainer_stepTiming, nnUNetTrainer_stepTiming])
def test_from_scratch_trainers_step_with_nnunet_parts(ws: dict, monkeypatch: pytest.MonkeyPatch,
                                                      trainer_class: type[StepTiming]) -> None:
    unet = trainer_class is nnUNetTrainer_stepTiming
    trainer = trainer_class.started(ws["ctpet"] if unet else ws["ct"],
                                    ws["unet_configuration"] if unet else ws["unetr_configuration"], "cpu")
    trainable = {k: p for k, p in trainer.network.named_parameters() if p.requires_grad}
    before = {k: p.detach().clone() for k, p in trainable.items()}
    steps_through_nnunet(trainer, monkeypatch)
    assert list(trainer.configuration_manager.patch_size) == [32, 32, 32]  # the preset's patch, also for the U-Net
    assert isinstance(trainer.loss, DeepSupervisionWrapper) == unet
    assert isinstance(trainer.batch["target"], list) == unet
    assert isinstance(trainer.optimizer, torch.optim.SGD) == unet
    assert sum(not torch.equal(p.detach(), before[k]) for k, p in trainable.items()) > 0.9 * len(trainable)


def test_driver_writes_json_and_markdown(bench: dict) -> None:
    result = json.loads((bench["root"] / "out.json").read_text())
    assert list(result["train"]) == list(SETUPS)
    for name, row in result["train"].items():
        assert len(row["step_s_all"]) == 2 and row["step_s_median"] > 0
        assert row["frozen_with_grad"] == 0 and row["frozen_with_optimizer_state"] == 0
        assert "checkpoint_final.pth" in result["files"][name]
    assert "adapter_final.safetensors" in result["files"]["pemma_adaptation"]
    assert result["train"]["pemma_adaptation"]["trainable"] < result["train"]["early_fusion"]["trainable"]
    assert result["train"]["unet"]["loss"] == "DeepSupervisionWrapper"
    assert result["train"]["h2aseg"]["loss"] == "DeepSupervisionWrapper"
    assert result["train"]["slices25d"]["patch_size"] == [32, 32]
    assert {"h2aseg_CP", "slices25d_CP"} <= set(result["inference"])  # the 2.5D network through stacked slices
    assert all(len(row["case_s_all"]) == 1 for row in result["inference"].values())
    markdown = (bench["root"] / "out.md").read_text()
    assert markdown.strip() in bench["stdout"]
    for row in result["train"].values():
        assert f"| {row['label']} | {row['trainable']:,} / {row['params']:,} |" in markdown
