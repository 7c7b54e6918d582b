"""2.5D input on nnU-Net's `2d` configuration: every slice's patch carries its k neighbouring slices.

A 2.5D network sees k = 2r + 1 neighbouring slices of every modality and predicts the centre one. nnU-Net's 2-D
data loader crops one slice per sample; wrapping its dataset in `NeighbourSlices` (through `NeighbourDatasets`, the
trainer's dataset class) makes that slice a stack of its neighbours (reflected at the volume's ends), so sampling,
foreground oversampling, padding and augmentation all stay nnU-Net's. Channels are modality-major: channel c * k + j holds modality c shifted by j - r slices.
"""

from __future__ import annotations

from typing import Any, Sequence, TypeVar

import numpy as np
import torch
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetBaseDataset

Volume = TypeVar("Volume", np.ndarray, torch.Tensor)


def check_slices(slices: int) -> int:
    """`slices` if it is a positive odd count: the centre slice needs as many neighbours above as below."""
    if not isinstance(slices, (int, np.integer)) or slices < 1 or slices % 2 == 0:
        raise ValueError(f"slices must be a positive odd number (the centre slice and r on each side), got {slices!r}")
    return int(slices)


def neighbour_indices(depth: int, slices: int) -> np.ndarray:
    """(depth, slices) int array: row z holds the slice indices z - r .. z + r (r = slices // 2), reflected at the
    volume's ends as numpy.pad(mode="reflect") does (-1 -> 1, depth -> depth - 2; a single slice is its own
    neighbour), so the end slices get real image context rather than zeros."""
    r = check_slices(slices) // 2
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    shifted = np.arange(depth)[:, None] + np.arange(-r, r + 1)[None, :]
    if depth == 1:
        return np.zeros_like(shifted)
    period = 2 * (depth - 1)  # reflection about 0 and depth - 1 repeats with this period
    folded = np.mod(shifted, period)
    return np.where(folded < depth, folded, period - folded)


def stack_neighbours(volume: Volume, slices: int) -> Volume:
    """(C, Z, Y, X) -> (C * slices, Z, Y, X): channel c * slices + j holds volume[c] shifted by j - slices // 2
    slices, reflected at the ends. Numpy arrays and torch tensors (on any device) alike."""
    if volume.ndim != 4:
        raise ValueError(f"expected a (C, Z, Y, X) volume, got shape {tuple(volume.shape)}")
    channels, depth, *plane = volume.shape
    index = neighbour_indices(depth, slices).T  # (slices, Z)
    if isinstance(volume, torch.Tensor):
        index = torch.as_tensor(index, device=volume.device)
    return volume[:, index].reshape(channels * slices, depth, *plane)


class NeighbourStack:
    """A lazy (C * slices, Z, Y, X) view of a (C, Z, Y, X) array-like (numpy array, np.memmap or blosc2 NDArray, as
    nnU-Net's datasets return them): a crop reads only the modalities and slices it needs, not k copies of the
    whole volume. Indexing with a tuple of slice objects (what acvl_utils' crop_and_pad_nd passes) gives an
    np.ndarray equal to stack_neighbours(volume, slices)[index]."""

    def __init__(self, volume: Any, slices: int) -> None:
        if len(volume.shape) != 4:
            raise ValueError(f"expected a (C, Z, Y, X) volume, got shape {tuple(volume.shape)}")
        self.volume = volume
        self.slices = check_slices(slices)
        self._index = neighbour_indices(volume.shape[1], slices)  # (Z, slices)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        channels, depth, height, width = self.volume.shape
        return channels * self.slices, depth, height, width

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.volume.dtype)

    @property
    def ndim(self) -> int:
        return 4

    def __getitem__(self, index: slice | Sequence[slice]) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > 4 or not all(isinstance(i, slice) for i in index):
            raise TypeError(f"NeighbourStack takes up to 4 slice objects, got {index!r}")
        channel_slice, z_slice, *plane = (*index, *(slice(None),) * (4 - len(index)))
        channels = np.arange(self.shape[0])[channel_slice]
        rows = self._index[z_slice]  # (nz, slices): source slice of every (z, offset)
        modality, offset = np.divmod(channels, self.slices)
        source = rows[:, offset].T  # (n_channels, nz)
        # read one block spanning the needed modalities and slices (the initial values keep empty crops empty)
        first_modality = modality.min(initial=self.volume.shape[0])
        first_slice = source.min(initial=self.volume.shape[1])
        block = np.asarray(self.volume[first_modality:modality.max(initial=-1) + 1,
                                       first_slice:source.max(initial=-1) + 1, plane[0], plane[1]])
        return block[(modality - first_modality)[:, None], source - first_slice]


class NeighbourSlices:
    """An nnU-Net dataset (nnUNetBaseDataset instance) whose cases load as NeighbourStacks of their images, so a
    2-D crop of a case is one slice with its neighbours; segmentations and properties are unchanged."""

    def __init__(self, dataset: nnUNetBaseDataset, slices: int) -> None:
        self.dataset = dataset
        self.slices = check_slices(slices)

    @property
    def identifiers(self) -> list[str]:
        return self.dataset.identifiers

    def load_case(self, identifier: str) -> tuple[NeighbourStack, Any, Any, dict]:
        data, seg, seg_prev, properties = self.dataset.load_case(identifier)
        return NeighbourStack(data, self.slices), seg, seg_prev, properties

    def __getitem__(self, identifier: str) -> tuple[NeighbourStack, Any, Any, dict]:
        return self.load_case(identifier)

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


class NeighbourDatasets:
    """Stands in for nnU-Net's dataset class (a trainer's ``dataset_class``): the datasets it makes are wrapped in
    NeighbourSlices; everything else (get_identifiers, unpack_dataset, ...) is the class's own.

    nnU-Net makes its training and validation loaders' datasets and its final validation's dataset from
    ``dataset_class``, so one replacement gives every one of them stacked slices: the loaders stay nnU-Net's
    nnUNetDataLoader, and the final validation's predictor, which hands the network single slices of the loaded
    volume, hands it the stacked slices. (A module-level class, so nnU-Net's augmentation workers can pickle it.)
    """

    def __init__(self, dataset_class: type[nnUNetBaseDataset], slices: int) -> None:
        self.dataset_class = dataset_class
        self.slices = check_slices(slices)

    def __call__(self, *args: Any, **kwargs: Any) -> NeighbourSlices:
        return NeighbourSlices(self.dataset_class(*args, **kwargs), self.slices)

    def __getattr__(self, name: str) -> Any:
        if name == "dataset_class":  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset_class, name)
