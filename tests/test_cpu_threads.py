"""PEMMA_CPU_THREADS: the thread cap trainers apply on CPU, and its bad values."""

from __future__ import annotations

import pytest
import torch

from nnunetv2_pemma.errors import PlansError
from nnunetv2_pemma.training.threads import CPU_THREADS_ENV, limit_cpu_threads


def test_cap_applies_on_cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CPU_THREADS_ENV, "1")
    torch.set_num_threads(2)
    limit_cpu_threads(torch.device("meta"))
    assert torch.get_num_threads() == 2, "no cap off the CPU"
    limit_cpu_threads(torch.device("cpu"))
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(CPU_THREADS_ENV, value)
    with pytest.raises(PlansError, match=rf"{CPU_THREADS_ENV}='{value}': expected a positive number of threads"):
        limit_cpu_threads(torch.device("cpu"))
