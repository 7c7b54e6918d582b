"""Context priors and the mixture of LoRA experts as PEMMA adaptation methods (tiny networks, CPU).

The mixture's experts compute what our LoRA layer computes (itself checked against peft in test_lora_vs_peft.py);
routing sends each sample to the expert its key selects, and an unknown key to the average of the experts.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import changed_keys, train_step
from networks_helpers import ATTENTION_LAYERS, Tiny, perturb
from nnunetv2_pemma.adaptation.layers import LoRAQKVLinear
from nnunetv2_pemma.adaptation.methods import MOA, PRIOR, added_by, is_added, train_only
from nnunetv2_pemma.adaptation.mixture import (PATTERNS, MoALoRAQKVLinear, expert_parameter_key, moa_layers,
                                               routing_weights)
from nnunetv2_pemma.adaptation.priors import FUSION_AFTER_BLOCKS, ContextPriors
from nnunetv2_pemma.errors import PlansError

D_IN, D, RANK, ALPHA = 20, 24, 4, 8


def _trained(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in layer.parameters():
            if p is not layer.weight and p is not getattr(layer, "bias", None):
                p.normal_(std=0.3)
    return layer


def _lora_with(expert: nn.Module, base: nn.Linear) -> LoRAQKVLinear:
    """Our LoRA layer holding one expert's factors."""
    lora = LoRAQKVLinear(base, RANK, ALPHA)
    with torch.no_grad():
        for part in ("A_q", "B_q", "A_v", "B_v"):
            getattr(lora, f"lora_{part}").copy_(getattr(expert, part))
    return lora


# --- the mixture layer ------------------------------------------------------------------------------------------


def test_a_routed_expert_computes_our_lora_and_an_unknown_key_their_average():
    base = nn.Linear(D_IN, 3 * D, bias=True)
    layer = _trained(MoALoRAQKVLinear(base, RANK, ALPHA, ["CHUM", "MDA", "HGJ"]))
    x = torch.randn(3, 7, D_IN)
    per_expert = [_lora_with(e, base)(x) for e in layer.moa_experts.values()]
    layer.route = routing_weights("center", layer.keys, torch.ones(3, 2, dtype=torch.bool), ["MDA", "HGJ", "CHUM"])
    out = layer(x)
    for sample, expert in enumerate((1, 2, 0)):
        torch.testing.assert_close(out[sample], per_expert[expert][sample])
    average = torch.stack(per_expert).mean(dim=0)
    layer.route = routing_weights("center", layer.keys, torch.ones(3, 2, dtype=torch.bool), ["USZ", "MDA", "CHB"])
    out = layer(x)
    torch.testing.assert_close(out[0], average[0])
    torch.testing.assert_close(out[2], average[2])
    torch.testing.assert_close(out[1], per_expert[1][1])
    layer.route = routing_weights("center", layer.keys, torch.ones(3, 2, dtype=torch.bool), None)  # no ids at all
    assert layer.route is None
    torch.testing.assert_close(layer(x), average)


def test_a_fresh_mixture_is_the_base_layer_and_only_routed_experts_get_gradients():
    base = nn.Linear(D_IN, 3 * D)
    layer = MoALoRAQKVLinear(base, RANK, ALPHA, ["A", "B"])
    x = torch.randn(2, 5, D_IN)
    torch.testing.assert_close(layer(x), base(x))
    layer.route = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    layer(x).sum().backward()
    assert layer.moa_experts["A"].B_q.grad is not None and layer.moa_experts["B"].B_q.grad is None


def test_modality_routing_follows_what_each_sample_holds():
    present = torch.tensor([[True, True], [True, False], [False, True]])
    weights = routing_weights("modality", PATTERNS, present, None)
    assert weights.argmax(dim=1).tolist() == [0, 1, 2] and weights.sum(dim=1).tolist() == [1.0, 1.0, 1.0]
    assert routing_weights("gate", ("expert0", "expert1"), present, ["X", "Y", "Z"]) is None
    with pytest.raises(ValueError, match="2 centres for a batch of 3"):
        routing_weights("center", ("X",), present, ["X", "Y"])


def test_the_gate_picks_its_top_expert_and_learns():
    layer = _trained(MoALoRAQKVLinear(nn.Linear(D_IN, 3 * D), RANK, ALPHA, ["e0", "e1", "e2"], gate=True))
    x = torch.randn(4, 6, D_IN)
    weights = layer.weights(x)
    probs = layer.moa_gate(x.mean(dim=1)).softmax(dim=-1)
    assert ((weights > 0).sum(dim=1) == 1).all()
    torch.testing.assert_close(weights.max(dim=1).values, probs.max(dim=1).values)
    assert weights.argmax(dim=1).tolist() == probs.argmax(dim=1).tolist()
    layer(x).sum().backward()
    assert layer.moa_gate.weight.grad is not None and layer.moa_gate.weight.grad.abs().sum() > 0


def test_expert_names_and_parameter_keys():
    with pytest.raises(ValueError, match="at least one expert"):
        MoALoRAQKVLinear(nn.Linear(D_IN, 3 * D), RANK, ALPHA, [])
    assert expert_parameter_key("vit.blocks.0.attn.qkv.moa_experts.HGJ.A_q") == "HGJ"
    assert expert_parameter_key("vit.blocks.0.attn.qkv.moa_gate.weight") is None
    assert expert_parameter_key("vit.blocks.0.attn.qkv.weight") is None


# --- the mixture in PEMMA networks ------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["UNETR", "SwinUNETR"])
def test_centre_routing_in_a_batch_equals_each_case_on_its_own(backbone):
    tiny = Tiny.of(backbone)
    net = tiny.adapted(tiny.base(), method="moa", moa_experts=("CHUM", "MDA"))
    assert len(moa_layers(net)) == ATTENTION_LAYERS[backbone]
    perturb(net, "moa_experts", "pet_fusion")
    x = tiny.image(2)
    with torch.no_grad():
        net.set_centers(["MDA", "CHUM"])
        batch = net(x)
        alone = []
        for i, centre in enumerate(("MDA", "CHUM")):
            net.set_centers(centre)
            alone.append(net(x[i:i + 1]))
        torch.testing.assert_close(batch, torch.cat(alone), atol=1e-5, rtol=1e-4)
        net.set_centers("CHUM")
        assert not torch.allclose(net(x[:1]), alone[0])  # the other expert gives another answer


def test_centre_routing_needs_its_experts():
    tiny = Tiny.of("UNETR")
    with pytest.raises(PlansError, match="needs its experts' centres"):
        tiny.pemma(method="moa")


def test_mixture_names_are_added_and_train_in_every_stage():
    tiny = Tiny.of("UNETR")
    net = tiny.adapted(tiny.base(), method="moa", moa_routing="gate")
    new = {k for k in net.state_dict() if is_added(k)}
    assert {added_by(k) for k in new} == {"pet_", "moa_"} and net.adapter_methods[1] is MOA
    assert sum("moa_experts" in k for k in new) == 12 * 3 * 4 and sum("moa_gate" in k for k in new) == 12 * 2
    assert set(train_only(net, "continual")) == {k for k, _ in net.named_parameters() if "moa_" in k}


# --- context priors ---------------------------------------------------------------------------------------------


def test_each_sample_gets_its_modalities_present_or_absent_tokens():
    priors = ContextPriors(hidden_size=8, num_heads=2, depth=3, num_tokens=2, entry="tokens")
    present = torch.tensor([[True, True], [True, False], [False, True]])
    selected = priors.select(present, block=1)
    assert selected.shape == (3, 4, 8)
    t = priors.tokens[1]  # (modality, state, k, C)
    for sample, (ct_state, pet_state) in enumerate(((0, 0), (0, 1), (1, 0))):
        assert torch.equal(selected[sample, :2], t[0, ct_state]) and torch.equal(selected[sample, 2:], t[1, pet_state])


@pytest.mark.parametrize("entry", ["tokens", "fusion"])
def test_prior_tokens_steer_only_the_samples_whose_input_selects_them(entry):
    tiny = Tiny.of("UNETR")
    net = tiny.adapted(tiny.base(), method="prior", prior_entry=entry)
    x = tiny.image(2)
    with torch.no_grad():
        if entry == "fusion":
            perturb(net, "gate")  # zero at the start: the priors do not reach the features yet
        full = net(x)
        net.set_input_modalities(("CT",))
        ct_only = net(x[:, :1])
        pet_absent = net.prior_context.tokens[:, 1, 1] if entry == "tokens" else net.prior_context.tokens[1, 1]
        pet_absent.normal_()  # only CT-only inputs use them
        net.set_input_modalities(("CT", "PET"))
        torch.testing.assert_close(net(x), full)
        net.set_input_modalities(("CT",))
        assert not torch.allclose(net(x[:, :1]), ct_only)


def test_prior_fusion_starts_as_the_plain_pemma_network():
    """Its zero gate passes the image tokens through unchanged, so at the start it is LoRA-PEMMA (B = 0)."""
    tiny = Tiny.of("UNETR")
    base = tiny.base()
    fused, plain = tiny.adapted(base, method="prior", prior_entry="fusion"), tiny.adapted(base)
    assert set(fused.prior_context.fusion) == {str(b) for b in FUSION_AFTER_BLOCKS}
    fused.load_state_dict(plain.state_dict(), strict=False)
    x = tiny.image(2)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x))
        fused.prior_context.fusion["6"].gate.fill_(1.0)
        assert not torch.allclose(fused(x), plain(x))


@pytest.mark.parametrize("entry", ["tokens", "fusion"])
def test_prior_stages_train_priors_with_lora_and_nothing_else(entry):
    tiny = Tiny.of("UNETR")
    net = tiny.adapted(tiny.base(), method="prior", prior_entry=entry, modality_dropout=(0.34, 0.33, 0.33))
    assert net.adapter_methods[1] is PRIOR
    adaptation = set(train_only(net, "adaptation"))
    assert adaptation == {k for k, _ in net.named_parameters() if k.startswith(("pet_", "prior_")) or "lora_" in k}
    continual = set(train_only(net, "continual"))
    assert continual == {k for k, _ in net.named_parameters() if k.startswith("prior_") or "lora_" in k}
    perturb(net, "lora_B")
    if entry == "fusion":
        perturb(net, "gate")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    train_step(net, tiny.image(2))
    changed = changed_keys(before, net)
    assert changed and changed <= continual and any(k.startswith("prior_context.tokens") for k in changed)


def test_swin_has_no_token_sequence_for_priors():
    with pytest.raises(PlansError, match="SwinUNETR's shifted-window attention has no token sequence"):
        Tiny.of("SwinUNETR").pemma(method="prior")
