"""The seed-to-seed spread of every claim's compared difference: how far another training seed moves it.

A run's interval over its test cases does not cover the training's own randomness; on the phantom, PEMMA's CP
Dice minus early fusion's was +0.00, -0.16 and -0.08 in seeds 0, 1 and 2, each with an interval over cases of
about ±0.05. `benchmarks/table2_phantom.py --record-spread` measures the standard deviation of each difference over
its seeds and records it here (`seed_spread.json`, per data source, preset and scope), and `pemma reproduce` and
`demo` widen their claims' intervals by it (`evaluation.intervals.with_seed_spread`). A setting without a record
is decided on its cases alone, and says so.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from nnunetv2_pemma.experiments.claims import Claim, spread_key

SPREAD_FILE = Path(__file__).with_name("seed_spread.json")


def setting(phantom: bool, preset: str, scope: str) -> str:
    """The key a spread is recorded under: what the runs it was measured on share."""
    return f"{'phantom' if phantom else 'hecktor'}/{preset}/{scope}"


def measure_spread(claims_per_seed: Sequence[Sequence[Claim]]) -> dict[str, float]:
    """Standard deviation over seeds (n - 1) of each compared difference that at least two seeds measured."""
    means: dict[str, list[float]] = {}
    for claims in claims_per_seed:
        for claim in claims:
            for label, difference in claim.parts:
                if difference.n:
                    means.setdefault(spread_key(claim.text, label), []).append(difference.mean)
    return {key: round(statistics.stdev(values), 4) for key, values in means.items() if len(values) > 1}


def _records(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def record_spread(key: str, spread: Mapping[str, float], seeds: Sequence[int], how: str,
                  path: Path = SPREAD_FILE) -> None:
    """Write (or replace) the spread of setting `key`, with the seeds and the command it was measured with."""
    records = _records(path)
    records[key] = {"seeds": list(seeds), "measured_with": how, "spread": dict(sorted(spread.items()))}
    path.write_text(json.dumps(dict(sorted(records.items())), indent=2) + "\n")


def load_spread(key: str, path: Path = SPREAD_FILE) -> dict[str, float]:
    """The recorded spread of setting `key`; empty when none was measured."""
    return dict(_records(path).get(key, {}).get("spread", {}))


def describe(key: str, path: Path = SPREAD_FILE) -> str:
    """One line for the report: what the claims' intervals cover."""
    record = _records(path).get(key)
    if record is None:
        return f"Claims decided on the test cases alone: no seed spread is recorded for {key}."
    return (f"Claims decided on intervals widened by the seed spread recorded for {key} (seeds "
            f"{', '.join(map(str, record['seeds']))}; {path.name}).")
