"""nnU-Net's validation pools as threads on a one-worker CPU training (nnunetv2_pemma.worker_pools).
That the validation writes the same files as nnU-Net's spawned workers: test_workflow's `--val` run."""

from __future__ import annotations

import multiprocessing
from multiprocessing.pool import ThreadPool

import nnunetv2.evaluation.evaluate_predictions as scoring
import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as training
import pytest
import torch

from nnunetv2_pemma import worker_pools


def test_pools_are_threads_inside_the_block_and_processes_after() -> None:
    with worker_pools.thread_pools(training, scoring):
        for module in (training, scoring):
            with module.multiprocessing.get_context("spawn").Pool(1) as pool:
                assert isinstance(pool, ThreadPool)
                assert pool.starmap(pow, [(2, 3), (3, 2)]) == [8, 9]
    assert training.multiprocessing is multiprocessing and scoring.multiprocessing is multiprocessing


def test_pools_are_restored_after_an_error() -> None:
    with pytest.raises(KeyError):
        with worker_pools.thread_pools(training):
            raise KeyError
    assert training.multiprocessing is multiprocessing


@pytest.mark.parametrize("device,processes,threads", [("cpu", 1, True), ("cpu", 2, False), ("cuda", 1, False)])
def test_only_a_one_worker_cpu_validation_uses_threads(monkeypatch: pytest.MonkeyPatch, device: str, processes: int,
                                                      threads: bool) -> None:
    import nnunetv2.configuration

    monkeypatch.setattr(nnunetv2.configuration, "default_num_processes", processes)
    with worker_pools.validation_in_threads(torch.device(device)):
        assert (training.multiprocessing is not multiprocessing) == threads
        assert (scoring.multiprocessing is not multiprocessing) == threads
    assert training.multiprocessing is multiprocessing


@pytest.mark.parametrize("processes,threads", [(1, True), (2, False)])
def test_only_one_process_planning_uses_threads(processes: int, threads: bool) -> None:
    import nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor as fingerprint
    import nnunetv2.experiment_planning.verify_dataset_integrity as integrity
    import nnunetv2.preprocessing.preprocessors.default_preprocessor as preprocessing

    with worker_pools.preprocessing_in_threads(processes):
        for module in (fingerprint, integrity, preprocessing):
            assert (module.multiprocessing is not multiprocessing) == threads
    assert all(m.multiprocessing is multiprocessing for m in (fingerprint, integrity, preprocessing))
