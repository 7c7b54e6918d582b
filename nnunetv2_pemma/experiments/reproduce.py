"""`pemma reproduce` / `pemma demo`: run (or resume) the protocol's jobs, score every model, and write Table 2, the
parameter table and the claims check. The steps themselves live in `protocol`, `scheduler`, `scoring`, `table2`
and `claims`; this module only puts them in order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from nnunetv2_pemma.experiments.claims import DEMO, Tolerances, check_claims
from nnunetv2_pemma.experiments.protocol import CNN_TRAINERS, Protocol, nnunet_environment
from nnunetv2_pemma.experiments.scheduler import Job, Slot, cpu_slots, run_job, run_jobs
from nnunetv2_pemma.experiments.scoring import score_base, score_models
from nnunetv2_pemma.experiments.seed_spread import describe, load_spread, setting
from nnunetv2_pemma.experiments.table2 import write_table2
from nnunetv2_pemma.errors import PemmaError
from nnunetv2_pemma.plans import load_preset
from nnunetv2_pemma.training.seeding import SEED_ENV


@dataclass(frozen=True)
class ReproduceResult:
    """One run's scored rows, with what the claims need besides them and each job's wall time."""

    out: Path
    rows: list[dict]
    base_row: dict | None  # the CT base on its own evaluation cases
    trainable_fraction: float
    timings: dict[str, float]
    setting: str  # data source, preset and scope: where its claims' seed spread is recorded (`seed_spread`)
    parameters: list[dict]  # trainable and total parameters per method (`evaluation.parameters`)


P = TypeVar("P")
TEST_CASES_PER_CENTER = 20  # the phantom's labelled test cases per centre: the cases of one Table 2 cell


def run_job_graph(out: Path, build: Callable[[Path], P], hecktor: Path | None, phantom_cases: int,
                  phantom_size: str, device: str, gpus: Sequence[str] | None, seed: int, cpu_jobs: int,
                  test_cases: int = TEST_CASES_PER_CENTER) -> tuple[P, dict[str, float]]:
    """Run (or resume) the jobs of `build(data folder)` under OUT (nnU-Net's folders there); `hecktor=None` draws a
    phantom with `seed` first (`phantom_cases` training and `test_cases` labelled test cases per centre), and every
    training is seeded with `seed` (PEMMA_SEED). Each job's wall time is added to OUT/timings.json. Returns the
    protocol and the timings of this run."""
    if seed < 0:
        raise PemmaError(f"--seed must be a non-negative integer, got {seed}")
    slots = [Slot(gpu=g) for g in gpus] if gpus else cpu_slots(cpu_jobs) if device == "cpu" else [Slot()]
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**nnunet_environment(out, device), SEED_ENV: str(seed)}
    if hecktor is None:
        hecktor = out / "hecktor_phantom"
        if not (hecktor / "imagesTr").is_dir():
            run_job(Job("phantom", ["pemma", "phantom", str(hecktor), "--cases-per-center", str(phantom_cases),
                                    "--labelled-test-cases-per-center", str(test_cases), "--size", phantom_size,
                                    "--seed", str(seed)], hecktor / "imagesTr"), env, logs)
    protocol = build(hecktor.resolve())
    timings = run_jobs(protocol.jobs, env, logs, slots)
    previous = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}
    (out / "timings.json").write_text(json.dumps({**previous, **timings}, indent=2))
    return protocol, timings


def run_protocol(out: Path, preset: str, hecktor: Path | None = None, phantom_cases: int = 30,
                 phantom_size: str = "small", device: str = "cpu", gpus: Sequence[str] | None = None,
                 scope: str = "full", seed: int = 0, cpu_jobs: int = 2, adapter_methods: Sequence[str] = (),
                 test_cases: int = TEST_CASES_PER_CENTER) -> ReproduceResult:
    """Run (or resume) the protocol and score it. `hecktor=None` uses a phantom drawn with `seed`;
    `adapter_methods` adds PEMMA rows with other adaptation methods (`protocol.ADAPTER_METHODS`)."""
    out = out.resolve()
    protocol, timings = run_job_graph(out, lambda data: Protocol(out, data, preset, device, scope, adapter_methods),
                                      hecktor, phantom_cases, phantom_size, device, gpus, seed, cpu_jobs,
                                      test_cases)
    tta = load_preset(preset).schedule.test_time_mirroring
    workers = cpu_jobs if device == "cpu" else 1
    rows = score_models(protocol, tta, workers)
    base_row = score_base(protocol, tta, workers)
    parameters = parameter_rows(protocol)
    return ReproduceResult(out, rows, base_row, parameters[-1]["trainable_over_phi"], timings,
                           setting(hecktor is None, preset, scope), parameters)


def parameter_rows(protocol: Protocol) -> list[dict]:
    """Parameter counts per method: from the preset for the transformers; for nnU-Net's U-Net, whose network the
    plans define, from the trained PEMMA model."""
    from nnunetv2_pemma.evaluation.parameters import measure, measure_trained
    from nnunetv2_pemma.inference.predictor import build_predictor

    if protocol.trainers is not CNN_TRAINERS:
        return measure(protocol.preset_name)
    folder = protocol.model_folder(502, protocol.trainers.pemma)
    return measure_trained(build_predictor(folder, [0], None, tta=False).network)


def run_reproduce(out: Path, preset: str, tolerances: Tolerances = DEMO, **kwargs) -> str:
    """`run_protocol`, then Table 2's files, parameters.md and claims.txt; returns the report to print."""
    from nnunetv2_pemma.evaluation.parameters import format_parameter_table

    result = run_protocol(out, preset, **kwargs)
    paths = write_table2(result.rows, result.out)
    (result.out / "parameters.md").write_text(format_parameter_table(result.parameters) + "\n")
    claims = check_claims(result.rows, tolerances, result.base_row, result.trainable_fraction,
                          load_spread(result.setting))
    lines = [*map(str, claims), describe(result.setting)]
    (result.out / "claims.txt").write_text("\n".join(lines) + "\n")
    return (f"{paths['md'].read_text()}\n" + "\n".join(lines)
            + f"\n\nTable 2: {paths['md']}, {paths['csv']}, {paths['png']}; claims: {result.out / 'claims.txt'}; "
              f"parameters: {result.out / 'parameters.md'}; logs: {result.out / 'logs'}")
