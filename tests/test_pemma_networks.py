"""PEMMA networks on both backbones: structure and equivalence with the CT base, initialisation, freezing, modality
dropout, the encode/decode split, the adapter registry, and checking of presets (tiny presets, CPU).

Where the backbones differ: UNETR adds PET tokens to the ViT's sequence; SwinUNETR fuses CT and PET patch features
with a 1x1x1 convolution (``pet_fusion``) before its stages.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import changed_keys, train_step
from networks_helpers import ATTENTION_LAYERS, CLASSES, TINY_PRESETS, Tiny, adaptation_sizes, perturb
from nnunetv2_pemma.adaptation.files import read_adapter, save_adapter
from nnunetv2_pemma.adaptation.layers import LoRAQKVLinear, set_adapters_enabled
from nnunetv2_pemma.adaptation.methods import (MODALITY_SLOTS, REGISTRY, AdapterMethod, added_by, get_method,
                                               is_added, qkv_methods, register, train_only, trainable_in)
from nnunetv2_pemma.config import PemmaBlock
from nnunetv2_pemma.environment import preset_folder
from nnunetv2_pemma.errors import PlansError
from nnunetv2_pemma.networks.backbones import parse_model
from nnunetv2_pemma.networks.mismatch import IncompatibleBaseError
from nnunetv2_pemma.networks.modality_slots import sample_modality_masks
from nnunetv2_pemma.plans import load_preset

BACKBONES = list(TINY_PRESETS)
PET_MODULES = {"UNETR": {"pet_patch_embedding", "pet_encoder1", "pet_beta"},
               "SwinUNETR": {"pet_patch_embed", "pet_fusion", "pet_encoder1", "pet_beta"}}
PET_ZERO_AT_ZERO_INIT = {"UNETR": ["pet_patch_embedding.patch_embeddings.weight",  # PET tokens: bare positions
                                   "pet_patch_embedding.patch_embeddings.bias"],
                         "SwinUNETR": ["pet_patch_embed.proj.weight"]}  # PET features: the CT embedding's bias
OTHER_BACKBONES_BASE = {"UNETR": r"it is a SwinUNETR \(swinViT\.\* keys\), not a UNETR: use PEMMASwinUNETR; .*"
                                 r"\d+ keys missing, e.g. \['vit\..*\d+ unexpected keys, e.g. \['swinViT\.",
                        "SwinUNETR": r"it is a UNETR \(vit\.\* keys\), not a SwinUNETR: use PEMMAUNETR"}


@pytest.fixture(params=BACKBONES)
def tiny(request: pytest.FixtureRequest) -> Tiny:
    return Tiny.of(request.param)


# --- plain bases and model sections ----------------------------------------------------------------------------


@pytest.mark.parametrize(("backbone", "patch", "message"), [
    ("UNETR", (32, 40, 32), r"multiples of 16, got \[32, 40, 32\]"),
    ("SwinUNETR", (32, 48, 64), r"multiples of 32.*\[32, 48, 64\]"),
    ("SwinUNETR", (32, 32, 32), "1x1x1 bottleneck"),
])
def test_plain_base_rejects_bad_patch_size(backbone, patch, message):
    with pytest.raises(ValueError, match=message):
        Tiny.of(backbone).base(img_size=patch)


@pytest.mark.parametrize(("backbone", "change", "message"), [
    ("UNETR", {"hiden_size": 48}, r"unknown keys \['hiden_size'\]"),
    ("UNETR", {"num_heads": 5}, "hidden_size 48 must be divisible by num_heads 5"),
    ("SwinUNETR", {"feature_sise": 12}, r"unknown keys \['feature_sise'\]"),
    ("SwinUNETR", {"num_heads": [5, 5, 5, 5]}, r"num_heads \[5, 5, 5, 5\] must divide the stage widths"),
    ("SwinUNETR", {"architecture": "UNETR"}, r"missing keys \['hidden_size'.*unknown keys \['attn_drop_rate'"),
    ("SwinUNETR", {"architecture": "SwinUNETR3"},
     r"'SwinUNETR3' is not one of \['H2ASeg', 'SliceInteraction25D', 'SwinUNETR', 'UNETR', 'nnUNet'\]"),
])
def test_model_section_rejects_bad_keys(backbone, change, message):
    model = Tiny.of(backbone).preset.model
    assert parse_model(model.to_json()) == model
    with pytest.raises(ValueError, match=message):
        parse_model({**model.to_json(), **change})


# --- structure --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_every_attention_layer_is_wrapped_once_by_the_method(tiny, method):
    base = tiny.base()
    net = tiny.adapted(base, ["CT"], method=method, missing_modality="drop")
    layers = net.attention_layers()
    assert len(layers) == ATTENTION_LAYERS[tiny.backbone]
    third = net.vit.blocks[2].attn if tiny.backbone == "UNETR" else net.swinViT.layers3[0].blocks[0].attn
    assert layers[2] is third
    wrapped = [m for m in net.modules() if isinstance(m, LoRAQKVLinear)]
    assert len(wrapped) == len(layers) and all(w is layer.qkv for w, layer in zip(wrapped, layers))
    assert all(type(w) is LoRAQKVLinear and w.use_dora == (method == "dora") for w in wrapped)
    assert net.adaptation.method == method and net.adapter_methods == (MODALITY_SLOTS, get_method(method))
    assert all(is_added(k) for k in set(net.state_dict()) - set(base.state_dict()))
    assert {n for n, _ in net.named_parameters() if "lora_" in n} == set(train_only(net, "continual"))
    x = tiny.image(1, batch=1)
    with torch.no_grad():  # LoRA and DoRA start as the base function
        torch.testing.assert_close(net(x), base(x))


def test_unknown_method_is_rejected(tiny):
    with pytest.raises(PlansError, match=r"adaptation method 'ia3' is not one of \['lora', 'dora', 'prior', 'moa'\]"):
        tiny.pemma(method="ia3")


def test_base_names_are_kept_and_new_names_are_marked(tiny):
    base = tiny.base()
    net = tiny.pemma()
    base_keys, net_keys = set(base.state_dict()), set(net.state_dict())
    new_keys = net_keys - base_keys
    assert base_keys <= net_keys
    assert all(k.startswith("pet_") or "lora" in k for k in new_keys)
    assert all(is_added(k) for k in new_keys) and not any(is_added(k) for k in base_keys)
    assert {added_by(k) for k in new_keys} == {"pet_", "lora_"}
    assert {k.split(".")[0] for k in new_keys if k.startswith("pet_")} == PET_MODULES[tiny.backbone]
    assert sum("lora_" in k for k in new_keys) == ATTENTION_LAYERS[tiny.backbone] * 4
    result = net.load_state_dict(base.state_dict(), strict=False)
    assert set(result.missing_keys) == new_keys and not result.unexpected_keys


# --- equivalence with the base and flexible inputs --------------------------------------------------------------


@pytest.mark.parametrize("adapters_enabled", [False, True])
def test_ct_only_drop_mode_equals_base(tiny, adapters_enabled):
    base = tiny.base()
    net = tiny.adapted(base, ["CT"], missing_modality="drop")
    set_adapters_enabled(net, adapters_enabled)  # enabled at init: B = 0, so still exactly the base
    perturb(net, "pet_")  # drop mode: the PET modules (Swin: the fusion conv too) play no part without PET
    x = tiny.image(1)
    with torch.no_grad():
        assert torch.equal(net(x), base(x))
        perturb(net, "lora_B")
        assert torch.equal(net(x), base(x)) is not adapters_enabled


def test_output_shape_and_flexible_inference_from_one_model(tiny):
    net = tiny.adapted(tiny.base())
    perturb(net, "pet_fusion", "lora_B")  # as after adaptation (Swin: PET now reaches the stages)
    ct_pet = tiny.image(2)
    outputs = {}
    with torch.no_grad():
        for mods, x in ((["CT", "PET"], ct_pet), (["CT"], ct_pet[:, :1]), (["PET"], ct_pet[:, 1:])):
            net.set_input_modalities(mods)
            outputs["+".join(mods)] = out = net(x)
            assert out.shape == (2, CLASSES, *tiny.img)
        # zero mode (the paper): a missing modality is a zero image
        net.set_input_modalities(["CT", "PET"])
        torch.testing.assert_close(outputs["CT"], net(torch.cat([ct_pet[:, :1], torch.zeros_like(ct_pet[:, :1])], 1)))
        net.set_input_modalities(["PET", "CT"])  # channel order follows the declaration
        torch.testing.assert_close(outputs["CT+PET"], net(ct_pet.flip(1)))
    assert not torch.allclose(outputs["CT+PET"], outputs["CT"])
    assert not torch.allclose(outputs["CT+PET"], outputs["PET"])

    with pytest.raises(ValueError, match="channels"):
        net(tiny.image(1))
    with pytest.raises(ValueError, match="MRI"):
        net.set_input_modalities(["CT", "MRI"])


def test_swin_rejects_input_sides_not_divisible_by_32():
    swin = Tiny.of("SwinUNETR")
    with pytest.raises(ValueError, match="divisible"):
        swin.pemma()(torch.randn(1, 2, 32, 32, 48))


def test_drop_mode_pet_only_uses_pet_inputs_and_pet_skip(tiny):
    base = tiny.base()
    net = tiny.adapted(base, ["PET"], missing_modality="drop")  # tiny presets: pet_init "cross", beta 1
    perturb(net, "pet_fusion")  # Swin: not used with one modality in drop mode
    x = tiny.image(1)
    with torch.no_grad():
        # with cross init the PET branches are copies of the CT ones, so PET alone behaves like the CT base
        assert torch.equal(net(x), base(x))


@pytest.mark.parametrize(("modalities", "missing"), [(("CT", "PET"), "zero"), (("CT",), "drop"), (("PET",), "drop")])
def test_encode_decode_give_the_forward_logits(tiny, modalities, missing):
    net = tiny.adapted(tiny.base(), modalities, missing_modality=missing)
    perturb(net, "pet_fusion", "lora_B")
    x = tiny.image(len(modalities), batch=1)
    with torch.no_grad():
        ct, pet = net.split_modalities(x)
        dropped = {m for m in ("CT", "PET") if m not in modalities and missing == "drop"}
        assert (ct is None, pet is None) == ("CT" in dropped, "PET" in dropped)
        encoded = net.encode(ct, pet)
        skip = net.input_skip(ct, pet)
        logits = net(x)
        assert torch.equal(net.decode(encoded, skip), logits)
        assert not torch.allclose(net.decode(encoded, torch.zeros_like(skip)), logits)  # the skip given is used
    deepest = encoded.tokens if tiny.backbone == "UNETR" else encoded[-1]  # what a survival head would read
    assert deepest.shape[0] == 1 and torch.isfinite(deepest).all()


def test_unetr_pet_tokens_join_attention_but_not_the_decoder():
    unetr = Tiny.of("UNETR")
    net = unetr.adapted(unetr.base())
    n = (32 // 16) ** 3
    lengths = []
    net.vit.blocks[0].register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    x = unetr.image(2, batch=1)
    with torch.no_grad():
        with_pet = net.encode(x[:, :1], x[:, 1:])
        ct_only = net.encode(x[:, :1], None)
    assert lengths == [2 * n, n]  # CT then PET tokens in the ViT
    hidden = unetr.preset.model.hidden_size
    assert with_pet.tokens.shape == (1, n, hidden) and len(with_pet.hidden_states) == 12
    assert all(h.shape == (1, n, hidden) for h in with_pet.hidden_states)
    assert not torch.allclose(with_pet.tokens, ct_only.tokens)  # PET reaches the CT tokens through attention


def test_swin_ct_pet_at_init_keeps_the_base_function():
    swin = Tiny.of("SwinUNETR")
    base = swin.base()
    net = swin.pemma()
    perturb(net, "pet_fusion")
    net.load_base_state_dict(base.state_dict())  # resets the fusion conv: the CT identity
    c = swin.preset.model.feature_size
    weight = net.pet_fusion.weight.view(c, 2 * c)
    assert torch.equal(weight, torch.cat([torch.eye(c), torch.zeros(c, c)], 1))
    assert net.pet_fusion.bias.abs().sum() == 0
    ct_pet = swin.image(2, batch=1)
    ct, pet = ct_pet[:, :1], ct_pet[:, 1:]
    with torch.no_grad():
        # fusion = CT identity and LoRA B = 0: the Swin stages see exactly the CT patch features
        assert torch.equal(net.patch_features(ct, pet), base.swinViT.patch_embed(ct))
        encoded, expected = net.encode(ct, pet), base.swinViT(ct, base.normalize)
        assert len(encoded) == len(expected) == 5
        for h_net, h_base in zip(encoded, expected):
            assert torch.equal(h_net, h_base)
        # with beta = 0 the PET skip is off too: CT+PET in, the CT base's output out
        assert torch.equal(swin.adapted(base, beta=0.0)(ct_pet), base(ct))


# --- initialisation from the base -------------------------------------------------------------------------------


def test_cross_init_copies_ct_modules(tiny):
    net = tiny.pemma(pet_init="cross")
    perturb(net, "pet_")
    net.load_base_state_dict(tiny.base().state_dict())
    ct_embedding, pet_embedding = net.patch_embeddings()
    assert any(getattr(net, name) is pet_embedding for name in PET_MODULES[tiny.backbone])
    for pet, ct in ((pet_embedding, ct_embedding), (net.pet_encoder1, net.encoder1)):
        for (name, p), q in zip(pet.state_dict().items(), ct.state_dict().values()):
            assert torch.equal(p, q), name
        assert all(p is not q for p, q in zip(pet.parameters(), ct.parameters()))  # copies, not shared


def test_zero_init_pet_features_ignore_the_image_but_still_learn(tiny):
    net = tiny.adapted(tiny.base(), pet_init="zero")
    state = net.state_dict()
    for key in PET_ZERO_AT_ZERO_INIT[tiny.backbone]:
        assert state[key].abs().sum() == 0, key
    _, pet_embedding = net.patch_embeddings()
    with torch.no_grad():
        a, b = pet_embedding(tiny.image(1, batch=1)), pet_embedding(tiny.image(1, batch=1))
        assert torch.equal(a, b) and a.abs().sum() > 0  # position embeddings / bias only: image-independent
        assert net.pet_encoder1(tiny.image(1, batch=1)).abs().sum() == 0
    train_only(net, "adaptation")
    net.train()
    net(tiny.image(2, batch=1)).square().mean().backward()
    if tiny.backbone == "UNETR":
        assert net.pet_patch_embedding.patch_embeddings.weight.grad.abs().sum() > 0
    else:
        c = tiny.preset.model.feature_size
        assert net.pet_fusion.weight.grad[:, c:].abs().sum() > 0  # the PET half is not stuck at zero


def test_random_init_keeps_fresh_pet_modules(tiny):
    net = tiny.pemma(pet_init="random")
    fresh = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("pet_")}
    net.load_base_state_dict(tiny.base().state_dict())
    for k, v in fresh.items():
        assert torch.equal(net.state_dict()[k], v), k
    assert not torch.equal(net.pet_encoder1.layer.conv1.conv.weight, net.encoder1.layer.conv1.conv.weight)
    ct_embedding, pet_embedding = net.patch_embeddings()
    weights = [(n, p, q) for (n, p), q in zip(pet_embedding.named_parameters(), ct_embedding.parameters())
               if p.ndim > 1]
    assert weights and all(not torch.equal(p, q) for _, p, q in weights), [n for n, _, _ in weights]


@pytest.mark.parametrize(("backbone", "change", "message"), [
    ("UNETR", {"img_size": (48, 48, 48)},
     r"position embeddings 1x27x48 vs 1x8x48: patch size differs \(48\^3 vs 32\^3\)"),
    ("UNETR", {"hidden_size": 60}, "hidden size 60 vs 48"),
    ("UNETR", {"in_channels": 2}, "input channels 2 vs 1"),
    ("UNETR", {"qkv_bias": True}, r"12 unexpected keys, e.g. \['vit.blocks.0.attn.qkv.bias'"),
    ("SwinUNETR", {"feature_size": 24}, "feature size 24 vs 12"),
    ("SwinUNETR", {"depths": (2, 1, 1, 1)}, r"depths \[2, 1, 1, 1\] vs \[1, 1, 1, 1\]"),
    ("SwinUNETR", {"num_heads": (3, 6, 12, 12)}, r"num_heads \[3, 6, 12, 12\] vs \[3, 3, 3, 3\]"),
    ("SwinUNETR", {"window_size": 2}, "window size 2 vs 4"),
    ("SwinUNETR", {"in_channels": 2}, "input channels 2 vs 1"),
    ("SwinUNETR", {"use_v2": True}, "use_v2 True vs False"),
    ("SwinUNETR", {"qkv_bias": False}, "qkv_bias False vs True"),
])
def test_incompatible_base_names_what_differs(backbone, change, message):
    assert issubclass(IncompatibleBaseError, ValueError)
    change = dict(change)
    in_channels, img_size = change.pop("in_channels", 1), change.pop("img_size", None)
    tiny = Tiny.of(backbone)
    base = tiny.with_model(**change).base(in_channels, img_size)
    with pytest.raises(IncompatibleBaseError, match=message):
        tiny.pemma().load_base_state_dict(base.state_dict())


def test_adapted_checkpoint_and_other_backbone_are_not_bases(tiny):
    net = tiny.pemma()
    with pytest.raises(IncompatibleBaseError, match=r"it holds adapter parameters \(pet_"):
        net.load_base_state_dict(net.state_dict())
    other = Tiny.of(next(b for b in BACKBONES if b != tiny.backbone)).base()
    with pytest.raises(IncompatibleBaseError, match=OTHER_BACKBONES_BASE[tiny.backbone]):
        net.load_base_state_dict(other.state_dict())


# --- freezing and training steps --------------------------------------------------------------------------------


def test_adaptation_step_trains_only_added_parameters(tiny):
    net = tiny.adapted(tiny.base(), learnable_beta=True)
    trainable = train_only(net, "adaptation")
    assert trainable == [n for n, p in net.named_parameters() if p.requires_grad]
    assert set(trainable) == {n for n, _ in net.named_parameters() if n.startswith("pet_") or "lora_" in n}
    assert all(is_added(n) and trainable_in(n, "adaptation", net.adapter_methods) for n in trainable)
    assert "pet_beta" in trainable
    before = {k: v.clone() for k, v in net.state_dict().items()}
    train_step(net, tiny.image(2))
    changed = changed_keys(before, net)
    assert changed and all(is_added(k) for k in changed)  # base bit-identical
    assert {k for k in before if k.startswith("pet_") or "lora_B" in k} <= changed
    assert all(p.grad is None for n, p in net.named_parameters() if not is_added(n))


def test_continual_step_with_ct_only_trains_only_lora(tiny):
    net = tiny.adapted(tiny.base(), ["CT"])  # PET is a zero image
    trainable = train_only(net, "continual")
    assert trainable and all("lora_" in n and trainable_in(n, "continual", net.adapter_methods) for n in trainable)
    perturb(net, "lora_B", "pet_fusion")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    train_step(net, tiny.image(1))
    changed = changed_keys(before, net)
    assert changed == {k for k in before if "lora_" in k}


def test_learnable_beta_is_a_parameter_fixed_beta_a_buffer(tiny):
    assert "pet_beta" in dict(tiny.pemma(learnable_beta=True).named_parameters())
    net = tiny.pemma(learnable_beta=False, beta=0.5)
    assert "pet_beta" not in dict(net.named_parameters()) and net.state_dict()["pet_beta"] == 0.5


# --- modality dropout -------------------------------------------------------------------------------------------


def test_sample_modality_masks_draws_all_patterns():
    keep_ct, keep_pet = sample_modality_masks([0.5, 0.25, 0.25], 400)
    patterns = {(bool(c), bool(p)) for c, p in zip(keep_ct, keep_pet)}
    assert patterns == {(True, True), (True, False), (False, True)}
    assert 0.15 < (~keep_pet).float().mean() < 0.35


class _Stop(Exception):
    pass


def test_modality_dropout_zeroes_inputs_in_training_only(tiny):
    net = tiny.pemma(modality_dropout=(0.4, 0.3, 0.3))
    ct_embedding, pet_embedding = net.patch_embeddings()
    seen = {}
    ct_embedding.register_forward_pre_hook(lambda m, args: seen.update(ct=args[0]))

    def pet_seen_stop(module, args):  # both inputs seen (CT's is embedded first): skip the expensive rest
        seen.update(pet=args[0])
        raise _Stop

    pet_embedding.register_forward_pre_hook(pet_seen_stop)

    def patterns() -> set[tuple[bool, bool]]:
        with pytest.raises(_Stop):
            net(x)
        has = {m: seen[m].flatten(1).abs().sum(1) > 0 for m in ("ct", "pet")}
        return {(bool(c), bool(p)) for c, p in zip(has["ct"], has["pet"])}

    x = tiny.image(2, batch=16)
    with torch.no_grad():
        net.train()
        assert patterns() == {(True, True), (True, False), (False, True)}
        net.eval()
        assert patterns() == {(True, True)}


# --- the adapter registry ---------------------------------------------------------------------------------------


def test_a_registered_method_joins_freezing_base_loading_and_adapter_files(tmp_path):
    unetr = Tiny.of("UNETR")
    base = unetr.base()
    net = unetr.adapted(base)
    net.toy_prompts = nn.Parameter(torch.zeros(4, unetr.preset.model.hidden_size))
    toy = AdapterMethod("toy", prefixes=("toy_",), trains={"adaptation": ("toy_",)})
    assert not is_added("toy_prompts")
    with pytest.raises(IncompatibleBaseError, match=r"1 key missing, e.g. \['toy_prompts'\]"):
        net.load_base_state_dict(base.state_dict())  # unregistered: a base tensor the base lacks
    register(toy)
    try:
        with pytest.raises(ValueError, match="'toy' is registered already"):
            register(toy)
        assert is_added("toy_prompts") and added_by("module._orig_mod.toy_prompts") == "toy_"
        assert "toy" not in qkv_methods()  # it does not adapt attention: no preset method
        with pytest.raises(PlansError, match="'toy'"):
            get_method("toy")
        assert trainable_in("toy_prompts", "adaptation", [toy]) and not trainable_in("toy_prompts", "continual", [toy])
        assert not trainable_in("toy_prompts", "adaptation", net.adapter_methods)  # the network does not carry it
        assert "toy_prompts" not in train_only(net, "adaptation")
        net.adapter_methods = (*net.adapter_methods, toy)
        adaptation = train_only(net, "adaptation")
        assert "toy_prompts" in adaptation and all(is_added(n) for n in adaptation)
        assert "toy_prompts" not in train_only(net, "continual")
        net.load_base_state_dict(base.state_dict())  # now an added tensor, not expected in a CT base
        path = save_adapter(net.state_dict(), tmp_path / "adapter.safetensors", trainer_name="T",
                            configuration="c", plans={}, dataset_json={}, mirroring_axes=None)
        assert "toy_prompts" in read_adapter(path)[0]
    finally:
        REGISTRY.pop(toy.name, None)
    assert not is_added("toy_prompts") and "toy" not in REGISTRY


# --- presets and plans blocks: one-line errors naming their file ------------------------------------------------


def preset_file(tmp_path: Path, name: str, change: dict) -> str:
    """Preset `name` with `change` (a dict value updates that section, anything else replaces it), as a file."""
    raw = json.loads((preset_folder() / f"{name}.json").read_text())
    for key, value in change.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    path = tmp_path / f"changed_{name}.json"
    path.write_text(json.dumps(raw))
    return str(path)


@pytest.mark.parametrize(("preset", "change", "message"), [
    ("tiny", {"patch_size": [32, 40, 32]}, r"UNETR needs a 3D patch size whose sides are multiples of 16, got "
                                           r"\[32, 40, 32\]"),
    ("tiny", {"patch_size": [32, 32]}, "multiples of 16"),
    ("swin_tiny", {"patch_size": [32, 48, 64]}, "SwinUNETR needs a 3D patch size whose sides are multiples of 32"),
    ("swin_tiny", {"patch_size": [32, 32, 32]}, r"\[32, 32, 32\] leaves a 1x1x1 bottleneck.*at least one side 64"),
    ("tiny", {"model": {"hiden_size": 48}}, r"'model' section: missing keys \[\], unknown keys \['hiden_size'\]"),
    ("swin_tiny", {"model": {"window": 4}}, r"'model' section: missing keys \[\], unknown keys \['window'\]"),
    ("tiny", {"adaptation": {"modality_dropout": [0.5, 0.5, 0.5]}},
     r"modality_dropout must be probabilities \[p_CP, p_C, p_P\] summing to 1, got \[0.5, 0.5, 0.5\]"),
    ("swin_tiny", {"adaptation": {"modality_dropout": [0.5, 0.5]}}, "modality_dropout must be probabilities"),
    ("tiny", {"adaptation": {"method": "vera"}},
     r"adaptation method must be one of \['lora', 'dora', 'prior', 'moa', 'conv_lora'\], got 'vera'"),
    ("tiny", {"adaptation": {"method": "conv_lora"}}, r"UNETR presets adapt with one of \['lora', 'dora', "),
    ("unet_tiny", {"adaptation": {"method": "lora"}}, r"nnUNet presets adapt with one of \['conv_lora'\], not 'lora'"),
    ("tiny", {"adaptation": {"prior_entry": "sideways"}}, r"prior_entry must be one of \['tokens', 'fusion'\]"),
    ("tiny", {"adaptation": {"prior_tokens": 0}}, "prior_tokens must be a positive integer, got 0"),
    ("tiny", {"adaptation": {"moa_routing": "random"}},
     r"moa_routing must be one of \['center', 'modality', 'gate'\], got 'random'"),
    ("tiny", {"adaptation": {"moa_experts": ["CHUM", "CHUM"]}}, r"moa_experts has duplicates"),
    ("tiny", {"adaptation": {"moa_experts": ["a.b"]}}, r"moa expert name 'a.b' must be letters"),
])
def test_bad_preset_is_a_one_line_error_naming_its_file(tmp_path, preset, change, message):
    path = preset_file(tmp_path, preset, change)
    with pytest.raises(PlansError, match=message) as info:
        load_preset(path)
    text = str(info.value)
    assert text.startswith(f"preset {path}: ") and "\n" not in text


@pytest.mark.parametrize(("preset", "patch"), [("tiny", [16, 48, 64]), ("swin_tiny", [32, 32, 64]),
                                               ("swin_tiny", [64, 32, 32]), ("swin_tiny", [32, 64, 96])])
def test_patch_sizes_each_backbone_accepts(tmp_path, preset, patch):
    assert load_preset(preset_file(tmp_path, preset, {"patch_size": patch})).patch_size == tuple(patch)


WHERE = "plans configuration nnUNetPlans_3d_unetr_tiny"


@pytest.mark.parametrize("backbone", BACKBONES)
def test_pemma_block_round_trips_through_json(backbone):
    block = Tiny.of(backbone).block(("PET", "CT"))
    assert PemmaBlock.parse(json.loads(json.dumps(block.to_json())), WHERE) == block


@pytest.mark.parametrize(("change", "message"), [
    ({"input_modalities": ["CT", "MRI"]},
     r"input_modalities must be distinct names from \('CT', 'PET'\), got \['CT', 'MRI'\]"),
    ({"input_modalities": ["CT", "CT"]}, "input_modalities must be distinct"),
    ({"adaptation": {"method": "vera"}}, "adaptation method must be one of"),
    ({"model": {"architecture": "UNETR", "hidden_size": 48}}, r"'model' section: missing keys \['mlp_dim'"),
    ({"preset": None, "schedule": {}}, r"'schedule' section: missing keys \['optimizer'"),
])
def test_bad_pemma_block_is_a_one_line_error_naming_the_configuration(change, message):
    block = Tiny.of("UNETR").block().to_json()
    changed = {k: {**block[k], **v} if k == "adaptation" else v for k, v in change.items()}
    with pytest.raises(PlansError, match=message) as info:
        PemmaBlock.parse({**block, **changed}, WHERE)
    text = str(info.value)
    assert text.startswith(f"{WHERE}: the 'pemma' block is not valid (") and "\n" not in text


# --- full-size presets ------------------------------------------------------------------------------------------


def test_paper_preset_trainable_parameter_count():
    sizes = adaptation_sizes("paper")  # UNETR-B; checks total = base + trainable = base + the parts
    assert set(sizes.parts) == {"pet_patch_embedding", "pet_encoder1", "lora_"}
    rank, hidden = sizes.preset.adaptation.lora_rank, sizes.preset.model.hidden_size
    assert sizes.parts["lora_"] == 12 * 2 * 2 * rank * hidden  # 12 blocks, Q and V, A and B
    assert 0.01 < sizes.ratio < 0.20


def test_swin_preset_trainable_parameter_count():
    sizes = adaptation_sizes("swin")  # SwinUNETR-48
    assert set(sizes.parts) == {"pet_patch_embed", "pet_fusion", "pet_encoder1", "lora_"}
    model, rank = sizes.preset.model, sizes.preset.adaptation.lora_rank
    c = model.feature_size
    widths = [c * 2**i for i in range(4)]
    assert sizes.parts["lora_"] == sum(d * 2 * 2 * rank * w for d, w in zip(model.depths, widths))  # Q, V; A, B
    assert sizes.parts["pet_fusion"] == 2 * c * c + c and sizes.parts["pet_patch_embed"] == 8 * c + c
    assert 0.001 < sizes.ratio < 0.05
