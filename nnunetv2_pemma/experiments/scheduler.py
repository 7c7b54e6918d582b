"""A small dependency graph of command-line jobs, run as subprocesses with one log each, resumable.

Training jobs ("device" jobs) run one per slot: one per GPU id, or on CPU as many as there are slots, each told
to use its share of the cores (PEMMA_CPU_THREADS). One CPU-only job (conversion, preprocessing) runs alongside.
Every job has an output that marks it done, so a stopped run resumes where it was.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from nnunetv2_pemma.errors import PemmaError
from nnunetv2_pemma.training.threads import CPU_THREADS_ENV, cpu_threads_from_environment


@dataclass
class Job:
    name: str
    argv: list[str]
    done: Path
    after: list[str] = field(default_factory=list)
    uses_device: bool = False


@dataclass(frozen=True)
class Slot:
    """Where a device job runs: a GPU id (CUDA_VISIBLE_DEVICES) or a share of the CPU cores."""

    gpu: str | None = None
    cpu_threads: int | None = None


def cpu_slots(n: int) -> list[Slot]:
    """n CPU slots that share the cores this process may run on. A PEMMA_CPU_THREADS set by the user is each
    slot's thread count instead: other work shares the machine (two 2-thread trainings beside another job on 2
    cores ran epochs 4-6x slower than 1-thread ones)."""
    threads = cpu_threads_from_environment() or max(1, len(os.sched_getaffinity(0)) // n)
    return [Slot(cpu_threads=threads) for _ in range(n)]


def _slug(name: str) -> str:
    return name.replace(" ", "_").replace(">", "")


def success_marker(logs: Path, name: str) -> Path:
    """Written when a job succeeds: the done-marker of jobs whose output does not show completion by itself."""
    return logs / f"{_slug(name)}.done"


def run_job(job: Job, env: dict[str, str], logs: Path, slot: Slot | None = None) -> float:
    """Run one job with its output in logs/<name>.log; returns its wall time in seconds."""
    exe = Path(sys.executable).parent / job.argv[0]
    argv = [str(exe) if exe.exists() else job.argv[0], *job.argv[1:]]
    env = dict(env)
    if job.argv[0] == "nnUNetv2_plan_and_preprocess":
        env.pop("nnUNet_n_proc_DA", None)  # the planner calls torch.set_num_threads with it, which rejects 0
    if slot is not None and slot.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot.gpu
    if slot is not None and slot.cpu_threads is not None:
        env[CPU_THREADS_ENV] = str(slot.cpu_threads)
    log = logs / f"{_slug(job.name)}.log"
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(argv, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise PemmaError(f"job '{job.name}' failed (exit {code}); its log: {log}")
    success_marker(logs, job.name).touch()
    return time.perf_counter() - start


def run_jobs(jobs: dict[str, Job], env: dict[str, str], logs: Path, slots: Sequence[Slot]) -> dict[str, float]:
    """Run the dependency graph: device jobs one per slot, and one CPU-only job alongside them.
    Returns each job's wall time."""
    pending = {n: j for n, j in jobs.items() if not j.done.exists()}
    finished = set(jobs) - set(pending)
    free: list[Slot] = list(slots) or [Slot()]
    timings: dict[str, float] = {}
    running: dict[Future, tuple[str, Slot | None]] = {}
    bar = tqdm(total=len(jobs), initial=len(finished), desc="jobs", unit="job")
    with ThreadPoolExecutor(max_workers=len(free) + 1) as pool:
        while pending or running:
            for name in [n for n, j in pending.items() if set(j.after) <= finished]:
                job = pending[name]
                if job.uses_device:
                    if not free:
                        continue
                    slot: Slot | None = free.pop(0)
                elif any(not jobs[n].uses_device for n, _ in running.values()):
                    continue
                else:
                    slot = None
                del pending[name]
                tqdm.write(f"-> {name}")
                running[pool.submit(run_job, job, env, logs, slot)] = (name, slot)
            if not running:
                waiting = {n: sorted(set(j.after) - finished) for n, j in pending.items()}
                raise PemmaError(f"jobs wait on jobs that cannot run: {waiting}")
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                name, slot = running.pop(future)
                timings[name] = round(future.result(), 1)
                finished.add(name)
                if slot is not None:
                    free.append(slot)
                bar.update(1)
    bar.close()
    return timings
