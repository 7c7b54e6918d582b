"""Time and peak memory of training steps and other calls, for benchmarks/speed_memory.py. Knows nothing of nnU-Net:
a measured object is anything with a network, an optimiser, a batch and a ``timed_step``."""

from __future__ import annotations

import gc
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch
from torch import nn


class Stepped(Protocol):
    network: nn.Module
    optimizer: torch.optim.Optimizer
    batch: dict[str, Any]

    def timed_step(self) -> object: ...


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(calls: dict[str, Callable[[], object]], device: torch.device, warmup: int,
                      rounds: int) -> dict[str, list[float]]:
    """Seconds of each call in each of `rounds` rounds after `warmup` unrecorded ones.

    The calls run round robin and the order rotates every round, so that load from other processes on a shared
    machine hits every call alike and no call always follows the same one.
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    for r in range(warmup + rounds):
        for name in order:
            synchronize(device)
            start = time.perf_counter()
            calls[name]()
            synchronize(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
        order = order[1:] + order[:1]
    return times


def cuda_peak_bytes(build: Callable[[], Stepped], device: torch.device, warmup: int, steps: int) -> int:
    """``torch.cuda.max_memory_allocated`` over `steps` steps after `warmup` (optimiser state created,
    cudnn.benchmark's trials done), minus what was allocated before `build`: weights, gradients, optimiser state,
    batch and activations, without the caching allocator's reserve."""
    gc.collect()
    torch.cuda.empty_cache()
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    subject = build()
    for _ in range(warmup):
        subject.timed_step()
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        subject.timed_step()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del subject
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def cpu_peak_in_fresh_process(build: Callable[[], Stepped], warmup: int, steps: int, threads: int
                              ) -> dict[str, int | None]:
    """`cpu_peak` in a new process (spawn): PyTorch keeps no CPU allocator statistics, and the OS's peak RSS
    only means something in a process that ran nothing else. `build` must be picklable."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(cpu_peak, (build, warmup, steps, threads))


def cpu_peak(build: Callable[[], Stepped], warmup: int, steps: int, threads: int) -> dict[str, int | None]:
    """Peak memory of building a subject and running `warmup + steps` steps, in bytes.

    rss_peak_bytes: peak RSS minus RSS before the build (VmHWM after resetting it through /proc/self/clear_refs;
      ru_maxrss where that is missing): what the OS had to provide, allocator slack and libraries' first-use
      memory included.
    tensor_peak_bytes: the CPU analogue of torch.cuda.max_memory_allocated, see `tensor_peak_bytes`.
    """
    torch.set_num_threads(threads)
    gc.collect()
    reset = _reset_peak_rss()
    before_kib = _status_kib("VmRSS")
    subject = build()
    for _ in range(warmup + steps):
        subject.timed_step()
    if reset and before_kib is not None:
        peak_kib = _status_kib("VmHWM") or 0
    else:  # ru_maxrss is KiB on Linux, bytes on macOS
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_kib, before_kib = (maxrss // 1024 if sys.platform == "darwin" else maxrss), before_kib or 0
    rss = (peak_kib - before_kib) * 1024
    return {"rss_peak_bytes": rss, "tensor_peak_bytes": tensor_peak_bytes(subject)}  # profiler after the RSS


def tensor_peak_bytes(subject: Stepped) -> int | None:
    """Bytes of CPU tensors at the peak of one step: the distinct storages alive before it (weights, buffers,
    gradients, optimiser state, batch) plus the highest running sum of the allocations and frees that
    ``torch.profiler(profile_memory=True)`` records during it. None where the profiler hides its raw events."""
    from torch.profiler import ProfilerActivity, profile

    network, optimizer = subject.network, subject.optimizer
    live = _storage_bytes([*network.parameters(), *network.buffers(), *(p.grad for p in network.parameters()),
                           *(v for state in optimizer.state.values() for v in state.values()),
                           *_tensors(subject.batch)])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        subject.timed_step()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        return None
    events = sorted((e.start_ns(), e.nbytes()) for e in results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return live + peak if events else None


def _tensors(value: object) -> Iterable[torch.Tensor]:
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _storage_bytes(tensors: Iterable[object]) -> int:
    """Bytes of the distinct storages behind `tensors` (shared ones count once)."""
    storages = {}
    for t in tensors:
        if torch.is_tensor(t):
            storage = t.untyped_storage()
            storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
