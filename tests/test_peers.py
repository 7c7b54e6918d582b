"""The peers' presets, their (CT, PET) input layer and `pemma compare`'s job graph (no training here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from nnunetv2_pemma.errors import PlansError
from nnunetv2_pemma.experiments.compare import CNN_BASE_TRAINER, PRETRAINING_CTPET, ROWS, Comparison
from nnunetv2_pemma.networks.modality_channels import ModalityChannels
from nnunetv2_pemma.networks.peers.h2aseg import H2ASeg
from nnunetv2_pemma.plans import load_preset


def _preset(tmp_path: Path, name: str, **changes) -> Path:
    raw = json.loads(Path(load_preset(name).source).read_text())
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if field:
            raw[section][field] = value
        else:
            raw[section] = value
    path = tmp_path / f"bad_{name}.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize("name, changes, message", [
    ("h2aseg_tiny", {"patch_size": [32, 32, 30]}, "multiples of 4"),
    ("h2aseg", {"patch_size": [64, 128, 120]}, "multiples of 16"),
    ("h2aseg_tiny", {"model.window": [4, 8]}, "window must be 3 positive integers"),
    ("h2aseg_tiny", {"model.widths": [8]}, "at least 2 levels"),
    ("slices25d_tiny", {"model.slices": 4}, "must be odd"),
    ("slices25d_tiny", {"patch_size": [32, 32, 32]}, "2-D patches"),
    ("unet_tiny", {"model.features": 8}, "unknown keys ['features']"),
    ("unet_tiny", {"model.max_num_features": None}, "base_num_features and max_num_features go together"),
    ("unet_tiny", {"model.base_num_features": 0}, "must be some positive integers"),
    ("unet_tiny", {"schedule.optimizer": "RMSprop"}, "unsupported optimizer"),
])
def test_bad_peer_presets_are_refused_in_one_line(tmp_path: Path, name: str, changes: dict, message: str) -> None:
    path = _preset(tmp_path, name, **changes)
    with pytest.raises(PlansError) as e:
        load_preset(str(path))
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_peer_presets_need_no_adaptation_section() -> None:
    """A network trained from scratch adapts nothing; like every model here it takes a missing modality as zero.
    The U-Net presets' section is that of PEMMA on the CNN (conv LoRA; an absent modality's slot is skipped)."""
    for name in ("h2aseg", "slices25d"):
        raw = json.loads(Path(load_preset(name).source).read_text())
        assert "adaptation" not in raw and load_preset(name).adaptation.missing_modality == "zero"
    for name in ("unet", "unet_demo", "unet_tiny"):
        adaptation = load_preset(name).adaptation
        assert (adaptation.method, adaptation.missing_modality) == ("conv_lora", "drop")


class _Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.decoder = nn.Module()
        self.seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return x


def test_a_2_5d_input_fills_the_absent_modalitys_slices_with_zeros() -> None:
    net = ModalityChannels(_Recorder(), ["PET"], slices=3)
    x = torch.randn(2, 3, 5, 4)
    net(x)
    assert net.network.seen.shape == (2, 6, 5, 4)
    assert torch.equal(net.network.seen[:, :3], torch.zeros(2, 3, 5, 4))  # CT's three slices
    assert torch.equal(net.network.seen[:, 3:], x)
    with pytest.raises(ValueError, match="single slices, predict with `pemma predict`"):
        net(torch.randn(1, 1, 5, 4))  # what nnU-Net's 2-D sliding window would pass


def test_deep_supervision_switches_the_right_module() -> None:
    h2aseg = ModalityChannels(H2ASeg(3, (16, 16, 16), widths=(4, 8)), ["CT", "PET"])
    h2aseg.set_deep_supervision(False)
    assert isinstance(h2aseg(torch.randn(1, 2, 16, 16, 16)), torch.Tensor)
    h2aseg.set_deep_supervision(True)
    assert len(h2aseg(torch.randn(1, 2, 16, 16, 16))) == 2
    unet = ModalityChannels(_Recorder(), ["CT"], slices=3)
    unet.set_deep_supervision(False)
    assert unet.network.decoder.deep_supervision is False


def _upstream(jobs: dict, name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        for after in jobs[todo.pop()].after:
            if after not in seen:
                seen.add(after)
                todo.append(after)
    return seen


def test_comparison_trains_every_row_and_nothing_else(tmp_path: Path) -> None:
    comparison = Comparison(tmp_path, tmp_path / "data", "demo", "cpu")
    jobs = comparison.jobs
    trainings = {j.done: n for n, j in jobs.items() if j.uses_device}
    wanted = {comparison.checkpoint(r.dataset, r.trainer, comparison.configs[r.kind]) for r in ROWS}
    source = comparison.checkpoint(PRETRAINING_CTPET, "SliceInteractionTrainer", comparison.configs["slices25d"])
    cnn_base = comparison.checkpoint(501, CNN_BASE_TRAINER, comparison.configs["unet"])
    assert set(trainings) == wanted | {source, cnn_base, comparison.checkpoint(501, "UNETRTrainer",
                                                                               comparison.base_config)}
    for row in (r for r in ROWS if r.from_cnn_base):  # PEMMA and early fusion on the CNN start from its CT base
        job = jobs[trainings[comparison.checkpoint(502, row.trainer, comparison.configs["unet"])]]
        assert job.argv[job.argv.index("-pretrained_weights") + 1] == str(cnn_base)
        assert trainings[cnn_base] in _upstream(jobs, job.name)
    assert not any(" 503" in n for n in jobs)  # late fusion's PET model is not a row
    fine_tune = jobs[trainings[comparison.checkpoint(502, "SliceInteractionFineTuningTrainer",
                                                      comparison.configs["slices25d"])]]
    assert fine_tune.argv[fine_tune.argv.index("-pretrained_weights") + 1] == str(source)
    assert trainings[source] in _upstream(jobs, trainings[fine_tune.done])
    last_transfer = "plans transfer 501->502 slices25d_demo"
    for done, name in trainings.items():
        if " on 502" in name:  # no training starts while a transfer still rewrites 502's plans
            assert last_transfer in _upstream(jobs, name)
    transfers = [n for n in jobs if n.startswith("plans transfer 501->502")]
    assert all(a in _upstream(jobs, b) for a, b in zip(transfers, transfers[1:]))
