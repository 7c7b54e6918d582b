"""Prognosis networks and loss, on the tiny preset (CPU, no nnU-Net run): the survival head's outputs, what each
stage trains, the clinical token and the widened early-fusion head, and the Cox loss against torchsurv and a
hand-computed partial likelihood."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torchsurv.loss.cox import neg_partial_log_likelihood

from nnunetv2_pemma.adaptation.methods import added_by, train_only
from nnunetv2_pemma.config import Preset
from nnunetv2_pemma.data.outcomes import CLINICAL_FEATURES, CaseOutcome, Outcomes
from nnunetv2_pemma.errors import PlansError
from nnunetv2_pemma.networks.build import build_survival_early_fusion, build_survival_network, build_survival_pemma
from nnunetv2_pemma.networks.prognosis import SurvivalHead, lesion_volumes, missing_clinical_vector
from nnunetv2_pemma.environment import preset_folder
from nnunetv2_pemma.plans import load_preset
from nnunetv2_pemma.training.survival_loss import (SegmentationAndSurvivalLoss, SurvivalTargets, batch_outcomes,
                                                   cox_loss)

CLASSES = 3
PATCH = (32, 32, 32)
F = len(CLINICAL_FEATURES)


@pytest.fixture(scope="module")
def block():
    return load_preset("tiny").block(("CT", "PET"))


@pytest.fixture(scope="module")
def base(block):
    return build_survival_network(load_preset("tiny").block(("CT",)), 1, CLASSES, PATCH)


def _x(batch: int = 2, channels: int = 2) -> torch.Tensor:
    return torch.randn(batch, channels, *PATCH)


def test_training_output_is_logits_and_risk_eval_output_is_logits(block, base):
    nets = [(base, 1), (build_survival_pemma(block, CLASSES, PATCH, clinical=True), 2),
            (build_survival_early_fusion(block, CLASSES, PATCH, clinical=True), 2)]
    for net, channels in nets:
        x = _x(channels=channels)
        net.train()
        logits, risk = net(x)
        assert logits.shape == (2, CLASSES, *PATCH) and risk.shape == (2,)
        net.eval()
        with torch.no_grad():
            assert torch.equal(net(x), net.segment_and_risk(x)[0])


def test_lesion_volumes_are_expected_voxel_counts():
    logits = torch.zeros(1, CLASSES, 2, 2, 2)
    logits[0, 1, 0] = 10.0  # class 1 all but certain in 4 of the 8 voxels; the other 4 uniform over 3 classes
    certain = math.exp(10) / (math.exp(10) + 2)
    expected = [4 * certain + 4 / 3, 4 * (1 - certain) / 2 + 4 / 3]
    assert lesion_volumes(logits)[0].tolist() == pytest.approx([math.log1p(v) for v in expected], rel=1e-5)


def test_the_survival_loss_does_not_reach_the_segmentation_through_the_volumes():
    net = build_survival_network(load_preset("tiny").block(("CT",)), 1, CLASSES, PATCH).train()
    with torch.no_grad():
        net.prognosis.linear.weight[:, : -(CLASSES - 1)] = 0.0  # the risk reads the volumes alone
    logits, risk = net(_x(channels=1))
    risk.sum().backward()
    assert net.prognosis.linear.weight.grad[0, -(CLASSES - 1):].abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for n, p in net.named_parameters() if not n.startswith("prognosis."))


def test_ct_plus_pet_stage_keeps_the_base_and_its_head_frozen(block, base):
    net = build_survival_pemma(block, CLASSES, PATCH, clinical=False)
    net.load_base_state_dict(base.state_dict())
    assert torch.equal(net.prognosis.linear.weight, base.prognosis.linear.weight)
    trained = set(train_only(net, "adaptation"))
    assert trained and {added_by(n) for n in trained} == {"pet_", "lora_"}
    assert not any(n.startswith("prognosis.") for n in trained)


def test_clinical_stage_trains_the_clinical_token_and_the_qkv_adapters_only(block):
    net = build_survival_pemma(block, CLASSES, PATCH, clinical=True)
    trained = set(train_only(net, "clinical"))
    assert {added_by(n) for n in trained} == {"ehr_", "lora_"}
    assert {n for n in trained if n.startswith("ehr_")} == {n for n, _ in net.named_parameters()
                                                            if n.startswith("ehr_")}


def test_the_clinical_token_reads_the_clinical_vector_and_none_means_a_missing_row(block):
    net = build_survival_pemma(block, CLASSES, PATCH, clinical=True).eval()
    torch.nn.init.normal_(net.ehr_token.embedding.weight)
    x = _x()
    with torch.no_grad():
        unset = net.segment_and_risk(x)[1]
        net.set_clinical(missing_clinical_vector().expand(2, -1))
        missing = net.segment_and_risk(x)[1]
        net.set_clinical(torch.rand(2, F))
        given = net.segment_and_risk(x)[1]
        net.set_clinical(None)
    assert torch.equal(unset, missing)
    assert not torch.allclose(given, missing)
    # the missing-row encoding is what the outcomes file gives a case without a row
    assert np.array_equal(missing_clinical_vector().numpy(), Outcomes(CLINICAL_FEATURES, {}).clinical_vector("X"))


def test_widened_early_fusion_head_starts_with_the_same_risks(block):
    fused = build_survival_early_fusion(block, CLASSES, PATCH, clinical=False).eval()
    with_clinical = build_survival_early_fusion(block, CLASSES, PATCH, clinical=True).eval()
    state = fused.state_dict()
    state.update(SurvivalHead.widened(fused.prognosis, F).state_dict(prefix="prognosis."))
    with_clinical.load_state_dict(state)
    x = _x()
    with torch.no_grad():
        with_clinical.set_clinical(torch.rand(2, F))
        assert torch.allclose(fused.segment_and_risk(x)[1], with_clinical.segment_and_risk(x)[1], atol=1e-6)


def _hand_cox(log_hz: list[float], event: list[bool], time: list[float]) -> float:
    """Cox's negative partial log-likelihood (no tied times), mean over events."""
    terms = [log_hz[i] - math.log(sum(math.exp(log_hz[j]) for j in range(len(time)) if time[j] >= time[i]))
             for i in range(len(time)) if event[i]]
    return -sum(terms) / len(terms)


def test_cox_loss_is_torchsurv_and_cox_partial_likelihood_on_known_cases():
    log_hz = torch.tensor([0.3, -1.2, 2.0, 0.1, 0.7, -0.4])
    event = torch.tensor([True, False, True, True, False, True])
    time = torch.tensor([100.0, 250.0, 40.0, 900.0, 600.0, 30.0])
    known = torch.tensor([True, True, True, True, True, False])  # the last case has no endpoint
    loss = cox_loss(log_hz, SurvivalTargets(event, time, known))
    k = known.numpy()
    expected = _hand_cox(log_hz.numpy()[k].tolist(), event.numpy()[k].tolist(), time.numpy()[k].tolist())
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() == pytest.approx(neg_partial_log_likelihood(log_hz[known], event[known], time[known]).item())
    # a case without an endpoint does not count, whatever its risk
    changed = log_hz.clone()
    changed[5] = 9.0
    assert cox_loss(changed, SurvivalTargets(event, time, known)).item() == pytest.approx(loss.item())


def test_cox_loss_is_zero_without_a_risk_set_but_stays_in_the_graph():
    log_hz = torch.tensor([0.5, -0.5], requires_grad=True)
    time = torch.tensor([10.0, 20.0])
    for event, known in ((torch.tensor([False, False]), torch.tensor([True, True])),
                         (torch.tensor([True, True]), torch.tensor([True, False]))):
        loss = cox_loss(log_hz, SurvivalTargets(event, time, known))
        assert loss.item() == 0.0
        loss.backward()


def test_joint_loss_adds_the_weighted_cox_loss_to_the_segmentation_loss():
    def segmentation(logits, target):
        return torch.nn.functional.cross_entropy(logits, target)

    loss = SegmentationAndSurvivalLoss(segmentation, weight=0.5)
    logits, target = torch.randn(2, CLASSES, 4, 4, 4), torch.randint(0, CLASSES, (2, 4, 4, 4))
    log_hz = torch.tensor([1.0, -1.0])
    targets = SurvivalTargets(torch.tensor([True, False]), torch.tensor([5.0, 9.0]), torch.tensor([True, True]))
    assert loss(logits, target).item() == pytest.approx(segmentation(logits, target).item())
    with pytest.raises(RuntimeError, match="no survival targets"):
        loss((logits, log_hz), target)
    loss.targets = targets
    assert loss((logits, log_hz), target).item() == pytest.approx(
        segmentation(logits, target).item() + 0.5 * _hand_cox([1.0, -1.0], [True, False], [5.0, 9.0]))


def test_batch_outcomes_follow_the_case_keys():
    row = tuple(float(i) for i in range(F))
    outcomes = Outcomes(CLINICAL_FEATURES, {"A-001": CaseOutcome("A", row, 1, 300.0),
                                            "A-002": CaseOutcome("A", None, 0, 800.0),
                                            "A-003": CaseOutcome("A", row, None, None)})
    clinical, targets = batch_outcomes(outcomes, ["A-003", "A-001", "A-002"])
    assert clinical.shape == (3, F) and clinical[1].tolist() == list(row)
    assert clinical[2].tolist() == missing_clinical_vector().tolist()
    assert targets.known.tolist() == [False, True, True]
    assert targets.event.tolist() == [False, True, False] and targets.time[1:].tolist() == [300.0, 800.0]


@pytest.mark.parametrize("section, problem", [
    ({"loss_weight": 0}, "survival loss_weight must be a positive number, got 0"),
    ({"ties": "exact"}, "survival ties must be one of ['efron', 'breslow'], got 'exact'"),
    ({"weight": 1}, "'survival' section: missing keys [], unknown keys ['weight']"),
])
def test_bad_survival_section_names_the_preset(section, problem):
    raw = json.loads((preset_folder() / "prognosis.json").read_text())
    raw["survival"] = section
    with pytest.raises(PlansError) as e:
        Preset.parse(raw, "mine", "mine.json")
    assert str(e.value) == f"preset mine.json: {problem}"


def test_prognosis_is_unetr_only():
    swin = load_preset("swin_tiny")
    with pytest.raises(PlansError, match="prognosis is implemented for UNETR presets, not SwinUNETR"):
        build_survival_network(swin.block(("CT",)), 1, CLASSES, swin.patch_size)
