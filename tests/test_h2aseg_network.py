"""H2ASeg (peer network, MICCAI 2024) on CPU: shapes on odd sizes, deep supervision, the BDSA/MCSA/TAMW blocks
against the paper's equations, and CT-only / PET-only inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nnunetv2_pemma.networks.peers.h2aseg import (
    H2ASEG_WINDOW,
    BiDirectionalSpatialAttention,
    H2ASeg,
    ModalityCooperativeSpatialAttention,
    TargetAwareModalityWeighting,
    _window_partition,
    _window_reverse,
    level_weights,
    level_windows,
)

CLASSES = 3


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def level_size(size: tuple[int, ...], level: int) -> tuple[int, ...]:
    return tuple(math.ceil(n / 2 ** (level - 1)) for n in size)


def test_level_weights_follow_eq_5() -> None:
    weights = level_weights(5)
    assert weights == pytest.approx([5 / 15, 4 / 15, 3 / 15, 2 / 15, 1 / 15])
    assert sum(weights) == pytest.approx(1.0)
    assert level_weights(1) == [1.0]
    with pytest.raises(ValueError):
        level_weights(0)


def test_level_windows_clip_to_the_level_size() -> None:
    windows = level_windows((64, 128, 128), 5, H2ASEG_WINDOW)
    assert windows == [(4, 8, 8)] * 5  # level 5 is (4, 8, 8): the window just fits
    assert level_windows((32, 32, 32), 5, (4, 8, 8)) == [(4, 8, 8), (4, 8, 8), (4, 8, 8), (4, 4, 4), (2, 2, 2)]
    assert level_windows((17, 23, 19), 4, (4, 8, 8)) == [(4, 8, 8), (4, 8, 8), (4, 6, 5), (3, 3, 3)]
    with pytest.raises(ValueError):
        level_windows((32, 32), 5, (4, 8, 8))


@pytest.mark.parametrize("patch, widths", [((20, 33, 24), (4, 8, 16, 32)), ((17, 23, 19), (8, 16, 32, 64, 128))])
def test_h2aseg_shapes_and_gradients_on_odd_sizes(patch: tuple[int, ...], widths: tuple[int, ...]) -> None:
    net = H2ASeg(CLASSES, patch, widths=widths)
    x = torch.randn(1, 2, *patch)
    outputs = net(x)
    assert isinstance(outputs, list) and len(outputs) == len(widths)
    assert [tuple(p.shape) for p in outputs] == [(1, CLASSES, *level_size(patch, k)) for k in range(1, len(widths) + 1)]
    sum(w * p.square().mean() for w, p in zip(level_weights(len(widths)), outputs)).backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())

    net.zero_grad(set_to_none=True)
    net.deep_supervision = False
    single = net(x)
    assert isinstance(single, torch.Tensor) and single.shape == (1, CLASSES, *patch)
    single.square().mean().backward()  # every head still feeds a TAMW: no unused parameters without DS either
    assert all(p.grad is not None for p in net.parameters())


def test_deep_supervision_scales_match_the_outputs() -> None:
    net = H2ASeg(CLASSES, (32, 32, 32), widths=(4, 8, 16, 32))
    assert net.deep_supervision_scales == [[1.0] * 3, [0.5] * 3, [0.25] * 3, [0.125] * 3]
    outputs = net(torch.randn(1, 2, 32, 32, 32))
    assert [list(p.shape[2:]) for p in outputs] == [[int(32 * s) for s in scale]
                                                    for scale in net.deep_supervision_scales]


@pytest.mark.parametrize("zeroed", [1, 0], ids=["ct_only", "pet_only"])
def test_single_modality_inputs_give_finite_outputs(zeroed: int) -> None:
    net = H2ASeg(CLASSES, (16, 24, 20), widths=(4, 8, 16))
    x = torch.randn(2, 2, 16, 24, 20)
    x[:, zeroed] = 0
    with torch.no_grad():
        outputs = net(x)
    assert [tuple(p.shape) for p in outputs] == [(2, CLASSES, *level_size((16, 24, 20), k)) for k in (1, 2, 3)]
    assert all(torch.isfinite(p).all() for p in outputs)


def test_h2aseg_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError):
        H2ASeg(1, (32, 32, 32))
    net = H2ASeg(CLASSES, (16, 16, 16), widths=(4, 8))
    with pytest.raises(ValueError):
        net(torch.randn(1, 1, 16, 16, 16))


def test_window_partition_round_trips() -> None:
    x = torch.randn(2, 3, 8, 12, 4)
    windows = _window_partition(x, (4, 4, 2))
    assert windows.shape == (2 * 2 * 3 * 2, 3, 4, 4, 2)
    assert torch.equal(windows[1], x[0, :, :4, :4, 2:4])  # x (fastest) windows come first after the batch
    assert torch.equal(_window_reverse(windows, (8, 12, 4)), x)


@pytest.mark.parametrize("size, window", [((9, 13, 11), (4, 8, 8)), ((3, 5, 2), (4, 8, 8))])
def test_mcsa_keeps_odd_shapes(size: tuple[int, ...], window: tuple[int, ...]) -> None:
    clipped = level_windows(size, 1, window)[0]
    for win in (window, clipped):  # unclipped: padded to a window bigger than the feature map; clipped: no padding
        mcsa = ModalityCooperativeSpatialAttention(4, win)
        ct, pet = torch.randn(2, 4, *size), torch.randn(2, 4, *size)
        out_ct, out_pet = mcsa(ct, pet)
        assert out_ct.shape == ct.shape and out_pet.shape == pet.shape
        assert torch.isfinite(out_ct).all() and torch.isfinite(out_pet).all()


def test_mcsa_interacts_across_windows_and_modalities() -> None:
    mcsa = ModalityCooperativeSpatialAttention(4, (2, 2, 2)).eval()
    ct, pet = torch.randn(1, 4, 8, 8, 8), torch.randn(1, 4, 8, 8, 8)
    perturbed = ct.clone()
    perturbed[..., :2, :2, :2] += 1.0  # the first CT window only
    with torch.no_grad():
        _, pet_out = mcsa(ct, pet)
        _, pet_changed = mcsa(perturbed, pet)
    # the last PET window is far from the first and from its 3x3x3 fusion convolutions: only the inter-window
    # (global) cross-modal attention links them
    assert not torch.allclose(pet_out[..., 6:, 6:, 6:], pet_changed[..., 6:, 6:, 6:])


class _Unchanged(torch.nn.Module):
    def forward(self, ct: torch.Tensor, pet: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ct, pet


class _Zero(torch.nn.Module):
    def forward(self, ct: torch.Tensor, pet: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros_like(ct), torch.zeros_like(pet)


def test_mcsa_inter_window_step_is_global_and_cross_modal() -> None:
    mcsa = ModalityCooperativeSpatialAttention(4, (2, 2, 2)).eval()
    mcsa.intra = _Unchanged()  # the output is E_hat: only the inter-window step acts
    ct, pet = torch.randn(1, 4, 8, 8, 8), torch.randn(1, 4, 8, 8, 8)
    with torch.no_grad():
        out_ct, out_pet = mcsa(ct, pet)
        changed_ct = ct.clone()
        changed_ct[..., :2, :2, :2] += 1.0
        changed_pet = pet.clone()
        changed_pet[..., :2, :2, :2] += 1.0
        assert not torch.allclose(mcsa(changed_ct, pet)[1][..., 6:, 6:, 6:], out_pet[..., 6:, 6:, 6:])
        assert not torch.allclose(mcsa(ct, changed_pet)[0][..., 6:, 6:, 6:], out_ct[..., 6:, 6:, 6:])


def test_mcsa_intra_window_step_is_local_and_cross_modal() -> None:
    mcsa = ModalityCooperativeSpatialAttention(4, (4, 4, 4)).eval()
    mcsa.inter = _Zero()  # E_hat = padded input + up-sampled zeros: only the intra-window step acts
    ct, pet = torch.randn(1, 4, 8, 8, 8), torch.randn(1, 4, 8, 8, 8)
    changed_ct = ct.clone()
    changed_ct[..., :4, :4, :4] += 1.0  # the first window
    with torch.no_grad():
        _, out_pet = mcsa(ct, pet)
        _, changed_pet = mcsa(changed_ct, pet)
    assert not torch.allclose(changed_pet[..., :4, :4, :4], out_pet[..., :4, :4, :4])
    outside = torch.ones(8, 8, 8, dtype=torch.bool)
    outside[:4, :4, :4] = False
    assert torch.equal(changed_pet[..., outside], out_pet[..., outside])


def reference_direction(block: torch.nn.Module, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """One BDSA direction written as the paper's eq. 1: A = V (x) Softmax(Q^T (x) K / sqrt(C))^T on (C, HWD)
    matrices; K_s, V_s from the source, Q_s, Q_t, K_t, V_t from the target; concat -> 3x3x3 conv (+ target)."""
    c = target.shape[1]
    q_s, q_t, k_t, v_t = (m.flatten(2) for m in F.conv3d(target, block.target_proj.weight,
                                                          block.target_proj.bias).split(c, dim=1))
    k_s, v_s = (m.flatten(2) for m in F.conv3d(source, block.source_proj.weight, block.source_proj.bias).split(c, 1))

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return v @ torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), dim=-1).transpose(1, 2)

    fused = torch.cat((attend(q_s, k_s, v_s), attend(q_t, k_t, v_t)), dim=1).reshape(target.shape[0], 2 * c,
                                                                                    *target.shape[2:])
    return target + F.conv3d(fused, block.fuse.weight, block.fuse.bias, padding=1)


def test_bdsa_matches_eq_1() -> None:
    bdsa = BiDirectionalSpatialAttention(6)
    ct, pet = torch.randn(2, 6, 3, 4, 5), torch.randn(2, 6, 3, 4, 5)
    with torch.no_grad():
        out_ct, out_pet = bdsa(ct, pet)
        torch.testing.assert_close(out_ct, reference_direction(bdsa.to_ct, ct, pet))
        torch.testing.assert_close(out_pet, reference_direction(bdsa.to_pet, pet, ct))


def test_bdsa_is_cross_modal_and_symmetric() -> None:
    bdsa = BiDirectionalSpatialAttention(4).eval()
    ct, pet = torch.randn(1, 4, 4, 4, 4), torch.randn(1, 4, 4, 4, 4)
    with torch.no_grad():
        out_ct, out_pet = bdsa(ct, pet)
        zero_ct, zero_pet = bdsa(ct, torch.zeros_like(pet))
        assert torch.isfinite(zero_ct).all() and torch.isfinite(zero_pet).all()
        # the CT output depends on PET, and the PET output on CT
        assert not torch.allclose(bdsa(ct, pet + 0.5 * torch.randn_like(pet))[0], out_ct)
        assert not torch.allclose(bdsa(ct + 0.5 * torch.randn_like(ct), pet)[1], out_pet)
        # swapping the two directions' weights and the inputs swaps the outputs
        swapped = BiDirectionalSpatialAttention(4).eval()
        swapped.to_ct.load_state_dict(bdsa.to_pet.state_dict())
        swapped.to_pet.load_state_dict(bdsa.to_ct.state_dict())
        swapped_ct, swapped_pet = swapped(pet, ct)
    torch.testing.assert_close(swapped_ct, out_pet)
    torch.testing.assert_close(swapped_pet, out_ct)


def test_tamw_weights_stay_inside_the_open_interval() -> None:
    tamw = TargetAwareModalityWeighting(12)
    features = torch.randn(2, 12, 5, 6, 7)
    foreground = torch.rand(2, 1, 5, 6, 7)
    for scale in (1.0, 1e4, -1e4):
        w_fore, w_back = tamw.weights(features * scale, foreground)
        assert w_fore.shape == w_back.shape == (2, 12)
        assert (w_fore.abs() < 1).all() and (w_back.abs() < 1).all()
    # with huge inputs tanh itself saturates to exactly 1 in float32: the bound is what keeps them inside
    assert torch.tanh(tamw.fore_mlp(((foreground * features * 1e4).mean((2, 3, 4))))).abs().max() == 1
    assert tamw(features, foreground).shape == features.shape


def test_tamw_follows_eq_4() -> None:
    tamw = TargetAwareModalityWeighting(8)
    features = torch.randn(2, 8, 4, 5, 6)
    background_only = torch.zeros(2, 1, 4, 5, 6)
    w_fore, w_back = tamw.weights(features, background_only)
    # no foreground: W_fore * F_fore contributes nothing
    torch.testing.assert_close(tamw(features, background_only), features + w_back[..., None, None, None] * features)
    foreground_only = torch.ones(2, 1, 4, 5, 6)
    w_fore, _ = tamw.weights(features, foreground_only)
    torch.testing.assert_close(tamw(features, foreground_only), features + w_fore[..., None, None, None] * features)
    # the weights come from two separate MLPs (foreground, background)
    same = torch.full((2, 1, 4, 5, 6), 0.5)
    w_fore, w_back = tamw.weights(features, same)
    assert not torch.allclose(w_fore, w_back)


def test_tamw_follows_eq_2_to_4_for_a_soft_foreground() -> None:
    tamw = TargetAwareModalityWeighting(8)
    features = torch.randn(2, 8, 4, 5, 6)
    p = torch.rand(2, 1, 4, 5, 6)
    w_fore, w_back = tamw.weights(features, p)
    expected_fore = torch.tanh(tamw.fore_mlp((p * features).mean((2, 3, 4))))
    expected_back = torch.tanh(tamw.back_mlp(((1 - p) * features).mean((2, 3, 4))))
    torch.testing.assert_close(w_fore, expected_fore, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w_back, expected_back, rtol=1e-5, atol=1e-6)
    w_fore, w_back = w_fore[..., None, None, None], w_back[..., None, None, None]
    expected = features + w_fore * p * features + w_back * (1 - p) * features
    torch.testing.assert_close(tamw(features, p), expected)
