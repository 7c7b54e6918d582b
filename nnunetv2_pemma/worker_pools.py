"""nnU-Net's worker pools as threads where one worker is all there is.

nnU-Net runs its per-case work in `multiprocessing.get_context("spawn")` pools: the final validation's export and
scoring (`nnUNet_def_n_proc` workers), and the dataset check, fingerprint and preprocessing of planning (`-np`). A
spawned worker is a fresh interpreter that imports torch and nnU-Net before its first case: about 5 s a pool on
two CPU cores (10 s when the cores are busy), for small datasets whose cases take a second. With one worker a
pool of one thread does the same: the same functions on the same arguments, beside the main thread as the
process would be.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from multiprocessing.pool import ThreadPool
from types import ModuleType, SimpleNamespace

import torch

# what nnU-Net asks of `multiprocessing`: get_context("spawn").Pool(n)
_THREADS = SimpleNamespace(get_context=lambda method=None: SimpleNamespace(Pool=ThreadPool))


def one_cpu_worker(device: torch.device) -> bool:
    """Whether nnU-Net would start one worker process per pool on a CPU training."""
    from nnunetv2.configuration import default_num_processes

    return device.type == "cpu" and default_num_processes == 1


@contextlib.contextmanager
def thread_pools(*modules: ModuleType) -> Iterator[None]:
    """Within the block, `multiprocessing.get_context(...).Pool` in these modules makes a pool of threads."""
    saved = [m.multiprocessing for m in modules]
    for m in modules:
        m.multiprocessing = _THREADS
    try:
        yield
    finally:
        for m, original in zip(modules, saved):
            m.multiprocessing = original


@contextlib.contextmanager
def validation_in_threads(device: torch.device) -> Iterator[None]:
    """nnUNetTrainer.perform_actual_validation's export and scoring pools as threads on a one-worker CPU
    training; unchanged otherwise."""
    if not one_cpu_worker(device):
        yield
        return
    import nnunetv2.evaluation.evaluate_predictions as scoring
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as training

    with thread_pools(training, scoring):
        yield


@contextlib.contextmanager
def preprocessing_in_threads(num_processes: int) -> Iterator[None]:
    """nnU-Net's dataset check, fingerprint extraction and preprocessing pools as one thread when
    `num_processes` is 1 (what `pemma plans` runs them with by default); unchanged otherwise."""
    if num_processes != 1:
        yield
        return
    import nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor as fingerprint
    import nnunetv2.experiment_planning.verify_dataset_integrity as integrity
    import nnunetv2.preprocessing.preprocessors.default_preprocessor as preprocessing

    with thread_pools(fingerprint, integrity, preprocessing):
        yield
