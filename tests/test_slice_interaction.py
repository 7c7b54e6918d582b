"""2.5D slice stacking on nnU-Net's 2-D loader and predictor, and the slice interaction module (SIM)."""

from __future__ import annotations

from pathlib import Path

import blosc2
import numpy as np
import pytest
import torch
import torch.nn as nn
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2, nnUNetDatasetNumpy, comp_blosc2_params
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_pemma.inference.slice_stack_predictor import SliceStackPredictor
from nnunetv2_pemma.networks.peers.slice_interaction import SliceInteractionModule, SliceInteractionNet
from nnunetv2_pemma.training.slice_stacking import (NeighbourDatasets, NeighbourSlices, NeighbourStack,
                                                    neighbour_indices, stack_neighbours)

K = 5
LABELS = {"background": 0, "tumour": 1, "node": 2}


def _reflect(z: int, depth: int) -> int:
    """numpy.pad's "reflect" for one index: mirror about 0 and depth - 1 until inside."""
    while not 0 <= z < depth:
        z = -z if z < 0 else 2 * (depth - 1) - z
    return z


@pytest.mark.parametrize("depth", [1, 2, 3, 7])
@pytest.mark.parametrize("slices", [1, 3, 5])
def test_neighbour_indices_match_numpy_reflect(depth: int, slices: int) -> None:
    r = slices // 2
    padded = np.pad(np.arange(depth), r, mode="reflect")
    expected = np.stack([padded[z:z + slices] for z in range(depth)])
    np.testing.assert_array_equal(neighbour_indices(depth, slices), expected)


@pytest.mark.parametrize("slices", [0, -3, 2, 4])
def test_bad_slices_or_depth_are_refused(slices: int) -> None:
    with pytest.raises(ValueError, match="odd"):
        neighbour_indices(5, slices)
    with pytest.raises(ValueError, match="odd"):
        NeighbourSlices(object(), slices)
    with pytest.raises(ValueError, match="odd"):
        SliceStackPredictor(slices=slices, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="depth"):
        neighbour_indices(0, 3)


def test_stack_neighbours_at_the_ends_and_inside() -> None:
    volume = np.random.default_rng(0).random((2, 6, 5, 4), dtype=np.float32)
    stacked = stack_neighbours(volume, K)
    assert stacked.shape == (10, 6, 5, 4)
    for c in range(2):
        for j in range(K):
            for z in range(6):
                np.testing.assert_array_equal(stacked[c * K + j, z], volume[c, _reflect(z + j - 2, 6)])
    as_torch = stack_neighbours(torch.from_numpy(volume), K)
    assert isinstance(as_torch, torch.Tensor)
    np.testing.assert_array_equal(as_torch.numpy(), stacked)


CROPS = [
    (slice(None), slice(0, 1), slice(0, 5), slice(0, 4)),  # first slice, whole plane
    (slice(None), slice(5, 6), slice(1, 4), slice(2, 4)),  # last slice
    (slice(None), slice(2, 4), slice(0, 3), slice(1, 3)),  # middle
    (slice(3, 8), slice(0, 6), slice(0, 5), slice(0, 4)),  # some channels of both modalities
]


@pytest.mark.parametrize("backend", ["numpy", "blosc2"])
def test_neighbour_stack_reads_what_stacking_gives(backend: str) -> None:
    volume = np.random.default_rng(1).random((2, 6, 5, 4), dtype=np.float32)
    stack = NeighbourStack(volume if backend == "numpy" else blosc2.asarray(volume), K)
    assert stack.shape == (10, 6, 5, 4) and stack.ndim == 4 and stack.dtype == np.float32
    stacked = stack_neighbours(volume, K)
    for crop in CROPS:
        patch = stack[crop]
        assert isinstance(patch, np.ndarray)
        np.testing.assert_array_equal(patch, stacked[crop])


def _save_cases(folder: Path, dataset_class: type, foreground: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """Preprocessed cases as nnU-Net writes them: (2, depth, 6, 5) float32 images, segmentations with foreground
    on one slice only, and class locations from nnU-Net's own preprocessor."""
    rng = np.random.default_rng(2)
    volumes = {}
    for name, (depth, fg_slice) in foreground.items():
        data = rng.random((2, depth, 6, 5), dtype=np.float32)
        seg = np.zeros((1, depth, 6, 5), dtype=np.int8)
        seg[0, fg_slice, 2:4, 1:3] = 1
        properties = {"class_locations": DefaultPreprocessor._sample_foreground_locations(seg, [1, 2])}
        if dataset_class is nnUNetDatasetBlosc2:
            blocks, chunks = comp_blosc2_params(data.shape, (6, 5))
            dataset_class.save_case(data, seg, properties, str(folder / name), chunks=chunks, blocks=blocks)
        else:
            dataset_class.save_case(data, seg, properties, str(folder / name))
        volumes[name] = data
    return volumes


@pytest.mark.parametrize("dataset_class", [nnUNetDatasetNumpy, nnUNetDatasetBlosc2])
@pytest.mark.parametrize("oversample", [0.0, 1.0])
def test_loader_stacks_the_sampled_slice_with_its_neighbours(tmp_path: Path, dataset_class: type,
                                                             oversample: float) -> None:
    foreground = {"deep": (7, 0), "end": (7, 6), "thin": (2, 1)}  # depth 2: every slice is an end
    volumes = _save_cases(tmp_path, dataset_class, foreground)
    datasets = NeighbourDatasets(dataset_class, K)  # what the 2.5D trainer puts in place of its dataset class
    loader = nnUNetDataLoader(datasets(str(tmp_path)), 2, (6, 5), (6, 5), LabelManager(LABELS, None),
                              oversample_foreground_percent=oversample)
    np.random.seed(0)
    seen: set[str] = set()
    for _ in range(6):
        batch = next(loader)
        assert batch["data"].shape == (2, 2 * K, 6, 5) and batch["target"].shape == (2, 1, 6, 5)
        for sample, target, key in zip(batch["data"].numpy(), batch["target"].numpy(), batch["keys"]):
            volume = volumes[key]
            centre = sample[[K // 2, K + K // 2]]
            z = [z for z in range(volume.shape[1]) if np.array_equal(volume[:, z], centre)]
            assert len(z) == 1, "the centre channels are no slice of the case"
            np.testing.assert_array_equal(sample, stack_neighbours(volume, K)[:, z[0]])
            assert (target[0, 2:4, 1:3] == 1).all() == (z[0] == foreground[key][1])
            if oversample == 1.0:  # foreground on an end slice forces that slice
                assert z[0] == foreground[key][1]
            seen.add(key)
    assert "thin" in seen


def test_neighbour_datasets_stand_in_for_the_dataset_class(tmp_path: Path) -> None:
    """nnU-Net calls its dataset class's static methods and pickles loaders into its augmentation workers."""
    import pickle

    _save_cases(tmp_path, nnUNetDatasetNumpy, {"a": (3, 1)})
    datasets = pickle.loads(pickle.dumps(NeighbourDatasets(nnUNetDatasetNumpy, K)))
    assert datasets.get_identifiers(str(tmp_path)) == ["a"]
    dataset = pickle.loads(pickle.dumps(datasets(str(tmp_path), ["a"])))
    assert isinstance(dataset, NeighbourSlices) and dataset.load_case("a")[0].shape == (2 * K, 3, 6, 5)
    with pytest.raises(ValueError, match="odd"):
        NeighbourDatasets(nnUNetDatasetNumpy, 4)


def test_neighbour_slices_passes_the_dataset_through(tmp_path: Path) -> None:
    _save_cases(tmp_path, nnUNetDatasetNumpy, {"a": (3, 1), "b": (4, 0)})
    dataset = nnUNetDatasetNumpy(str(tmp_path))
    wrapped = NeighbourSlices(dataset, K)
    assert wrapped.identifiers == ["a", "b"] and wrapped.source_folder == str(tmp_path)
    data, seg, seg_prev, properties = wrapped.load_case("b")
    assert isinstance(data, NeighbourStack) and data.shape == (2 * K, 4, 6, 5)
    assert seg.shape == (1, 4, 6, 5) and seg_prev is None and "class_locations" in properties


def test_sim_keeps_odd_shapes_and_trains_every_parameter() -> None:
    sim = SliceInteractionModule(modalities=2, slices=K)
    x = torch.randn(2, 2 * K, 17, 23)
    out = sim(x)
    assert out.shape == x.shape
    out.square().mean().backward()
    for name, p in sim.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_sim_is_a_residual_over_its_attention_branch() -> None:
    sim = SliceInteractionModule(modalities=2, slices=K).eval()
    x = torch.randn(1, 2 * K, 9, 11)
    with torch.no_grad():
        assert not torch.allclose(sim(x), x)
        d = sim.depthwise(x)
        channel = sim.channel_attention(d.mean(dim=(2, 3)))[:, :, None, None]
        spatial = sim.spatial_attention(d)  # (1, modalities, H, W): one map per modality
        assert spatial.shape == (1, 2, 9, 11)
        weights = channel * torch.cat([spatial[:, :1].expand(-1, K, -1, -1), spatial[:, 1:].expand(-1, K, -1, -1)], 1)
        torch.testing.assert_close(sim(x) - x, d * weights)
        sim.depthwise[0].weight.zero_()
        torch.testing.assert_close(sim(x), x)


def test_sim_spatial_map_of_a_modality_reads_only_its_slices() -> None:
    sim = SliceInteractionModule(modalities=2, slices=K).eval()
    x = torch.randn(1, 2 * K, 9, 11)
    changed = x.clone()
    changed[:, K:] = torch.randn(1, K, 9, 11)  # the second modality's slices
    with torch.no_grad():
        a, b = sim.spatial_attention(sim.depthwise(x)), sim.spatial_attention(sim.depthwise(changed))
    torch.testing.assert_close(a[:, 0], b[:, 0])
    assert not torch.allclose(a[:, 1], b[:, 1])


def test_sim_refuses_an_even_spatial_kernel() -> None:
    with pytest.raises(ValueError, match="odd"):
        SliceInteractionModule(2, K, spatial_kernel=6)


def _unet() -> PlainConvUNet:
    return PlainConvUNet(input_channels=2 * K, n_stages=3, features_per_stage=(8, 16, 32), conv_op=nn.Conv2d,
                         kernel_sizes=3, strides=(1, 2, 2), n_conv_per_stage=2, num_classes=3,
                         n_conv_per_stage_decoder=1, conv_bias=True, norm_op=nn.InstanceNorm2d,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                         nonlin_kwargs={"inplace": True}, deep_supervision=True)


def test_slice_interaction_net_around_nnunets_2d_unet() -> None:
    net = SliceInteractionNet(_unet(), modalities=2, slices=K)
    x = torch.randn(2, 2 * K, 32, 24)
    outputs = net(x)
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 32, 24), (2, 3, 16, 12)]
    outputs[0].mean().backward()  # the input passes through the SIM, which trains with the U-Net
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.sim.parameters())
    assert net.decoder is net.unet.decoder
    net.decoder.deep_supervision = False
    out = net(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 32, 24)


class _PixelNet(nn.Module):
    """A 1x1 convolution that records the input shapes it is given."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, classes, 1)
        self.inputs: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(tuple(x.shape))
        return self.conv(x)


def test_predictor_stacks_the_neighbours_of_every_slice() -> None:
    net = _PixelNet(2 * K, len(LABELS))
    plans = {"configurations": {"2d": {"patch_size": [16, 16], "architecture": {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet", "arch_kwargs": {},
        "_kw_requires_import": []}}}, "label_manager": "LabelManager"}
    plans_manager = PlansManager(plans)
    # no Gaussian weighting: nnU-Net accumulates in half precision, where its tiny corner weights lose digits
    predictor = SliceStackPredictor(slices=K, use_gaussian=False, use_mirroring=False,
                                    perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.manual_initialization(net, plans_manager, plans_manager.get_configuration("2d"), None,
                                    {"labels": LABELS}, "nnUNetTrainer", None)
    image = torch.randn(2, 4, 16, 16)
    logits = predictor.predict_sliding_window_return_logits(image)
    assert logits.shape == (3, 4, 16, 16)
    assert net.inputs == [(1, 2 * K, 16, 16)] * 4
    with torch.no_grad():  # a 1x1 conv sees each slice's stacked neighbours, so it gives the same logits here
        expected = net.conv(stack_neighbours(image, K).permute(1, 0, 2, 3)).permute(1, 0, 2, 3)
    torch.testing.assert_close(logits.float(), expected, atol=1e-2, rtol=1e-2)
