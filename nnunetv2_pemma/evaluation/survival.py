"""Prognosis evaluation of predicted risks against relapse-free survival (`pemma evaluate-survival`).

The risk CSV (columns `case` and `risk`, as `pemma predict-risk` writes it; other columns are ignored) is scored
against the endpoints of `outcomes.json` (relapse 0/1, RFS in days):

* **Harrell's C-index** with lifelines' `concordance_index`, where a HIGHER risk means an EARLIER event (so lifelines,
  which expects survival-time-like scores, gets `-risk`). lifelines' pair rules: a pair is comparable when the
  earlier time is an event, or when an event and a censoring share a time (the censored case outlived it); two
  events at the same time are not comparable; tied risks count 1/2.
* its **percentile bootstrap interval** over cases, seeded so that reruns give the same numbers;
* the **Kaplan-Meier curves** of the low- and high-risk halves (split at the median risk) and their **log-rank
  p-value** (lifelines' `logrank_test`).

Cases of the risk CSV without an endpoint in the outcomes are left out and counted; a case the outcomes do not know
is an error (a risk CSV of another dataset), as are malformed CSV rows. Nothing is written unless all inputs pass.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from lifelines.utils import concordance_index

from nnunetv2_pemma.errors import InputDataError, PemmaError

REPORT_FILE = "survival.json"
PLOT_FILE = "kaplan_meier.png"
LEVEL = 0.95
_MAX_LISTED = 10  # case ids named in one error message


@dataclass(frozen=True)
class SurvivalReport:
    """What `evaluate_survival` wrote to `survival.json`.

    per_centre: centre -> `{"n_cases", "n_events", "c_index"}`; `c_index` is None where the centre's cases hold
        no event or no comparable pair.
    left_out: risk-CSV cases without an endpoint in the outcomes (not scored).
    """

    risks_csv: str
    outcomes: str
    out_dir: str
    n_cases: int
    n_events: int
    c_index: float
    c_index_ci95: tuple[float, float]
    n_resamples: int
    logrank_p: float
    left_out: tuple[str, ...]
    per_centre: Mapping[str, Mapping[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (a NaN p-value becomes None)."""
        return {"risks_csv": self.risks_csv, "outcomes": self.outcomes, "n_cases": self.n_cases,
                "n_events": self.n_events, "c_index": self.c_index, "c_index_ci95": list(self.c_index_ci95),
                "bootstrap_resamples": self.n_resamples,
                "logrank_p": None if math.isnan(self.logrank_p) else self.logrank_p,
                "logrank_groups": "risk <= median vs risk > median", "n_left_out": len(self.left_out),
                "left_out": list(self.left_out), "per_centre": {k: dict(v) for k, v in self.per_centre.items()}}

    def __str__(self) -> str:
        low, high = self.c_index_ci95
        p = "n/a" if math.isnan(self.logrank_p) else (f"{self.logrank_p:.3f}" if self.logrank_p >= 0.001
                                                      else f"{self.logrank_p:.1e}")
        out = Path(self.out_dir)
        return (f"C-index {self.c_index:.2f} (95% CI {low:.2f}-{high:.2f}) on {self.n_cases} cases, "
                f"{self.n_events} events; log-rank p = {p} (low vs high risk halves)\n"
                f"{len(self.left_out)} cases without an endpoint left out; wrote {out / REPORT_FILE} and "
                f"{out / PLOT_FILE}")


def harrell_c(risk: np.ndarray, time: np.ndarray, event: np.ndarray) -> float:
    """Harrell's C-index (lifelines) of risks where higher means an earlier event.

    Checked first, since lifelines would fail with a ZeroDivisionError or a bare ValueError: same lengths, finite
    values, events 0/1, at least one event and one comparable pair.
    """
    risk, time, event = _checked_arrays(risk, time, event)
    c = _concordance(risk, time, event)
    if c is None:
        raise InputDataError(f"no comparable pair among the {len(risk)} cases (events: {int(event.sum())}): a pair "
                             "needs an event before the other case's event or censoring time")
    return c


def bootstrap_interval(risk: np.ndarray, time: np.ndarray, event: np.ndarray, n_resamples: int = 1000,
                       seed: int = 0, level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of `harrell_c`: cases drawn with replacement `n_resamples` times from a
    generator seeded with `seed` (so reruns are identical).

    A resample without an event or a comparable pair has no C-index and is skipped, so the interval comes from the
    remaining resamples (with a few events per case set this is rare; with none left it is an error).
    """
    if n_resamples < 1:
        raise PemmaError(f"the number of bootstrap resamples must be at least 1, not {n_resamples}")
    if not 0 < level < 1:
        raise PemmaError(f"the interval level must lie between 0 and 1, not {level}")
    harrell_c(risk, time, event)  # the checks, and a defined point estimate
    risk, time, event = (np.asarray(a, dtype=float) for a in (risk, time, event))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_resamples):
        idx = rng.integers(0, len(risk), len(risk))
        c = _concordance(risk[idx], time[idx], event[idx])
        if c is not None:
            values.append(c)
    if not values:
        raise InputDataError(f"none of the {n_resamples} bootstrap resamples of the {len(risk)} cases has a "
                             "comparable pair; too few cases or events for an interval")
    tail = (1 - level) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


def kaplan_meier_png(risk: np.ndarray, time: np.ndarray, event: np.ndarray, path: Path, title: str) -> float:
    """Kaplan-Meier curves of the low-risk (risk <= median) and high-risk (risk > median) halves, with 95%
    confidence bands and numbers at risk, and their log-rank p-value in the plot; write the PNG to `path`
    atomically and return the p-value."""
    p, png = _kaplan_meier(*_checked_arrays(risk, time, event), title)
    _write_atomically({Path(path): png})
    return p


def evaluate_survival(risks_csv: Path, outcomes: Path, out_dir: Path, n_resamples: int = 1000) -> SurvivalReport:
    """C-index with its 95% bootstrap interval, per-centre C-index, and the Kaplan-Meier log-rank test of the
    risks in `risks_csv` against the endpoints in `outcomes` (an outcomes.json or the raw dataset folder holding
    it); writes `survival.json` and `kaplan_meier.png` to `out_dir` (replacing earlier ones), nothing on an error."""
    from nnunetv2_pemma.data.outcomes import OUTCOMES_FILE, load_outcomes

    risks_csv, out_dir, outcomes = Path(risks_csv), Path(out_dir), Path(outcomes)
    outcomes_file = outcomes / OUTCOMES_FILE if outcomes.is_dir() else outcomes
    if out_dir.exists() and not out_dir.is_dir():
        raise InputDataError(f"{out_dir}: exists and is not a folder; give the folder to write the report to")
    risks = _read_risks(risks_csv)
    table = load_outcomes(outcomes_file)
    unknown = [case for case in risks if case not in table.cases]
    if unknown:
        raise InputDataError(f"{risks_csv}: {len(unknown)} cases are not in the outcomes {outcomes_file}: "
                             f"{_list(unknown)} (a risk CSV of another dataset?)")
    endpoints = {case: table.endpoint(case) for case in risks}
    scored = [case for case, endpoint in endpoints.items() if endpoint is not None]
    left_out = tuple(case for case, endpoint in endpoints.items() if endpoint is None)
    if not scored:
        raise InputDataError(f"{risks_csv}: none of its {len(risks)} cases has an endpoint in {outcomes_file}")
    risk = np.array([risks[case] for case in scored])
    event = np.array([endpoints[case][0] for case in scored], dtype=float)
    time = np.array([endpoints[case][1] for case in scored], dtype=float)
    try:
        c = harrell_c(risk, time, event)
        ci = bootstrap_interval(risk, time, event, n_resamples=n_resamples)
        p, png = _kaplan_meier(risk, time, event, f"Relapse-free survival by predicted risk ({risks_csv.name})")
    except InputDataError as e:
        raise InputDataError(f"{risks_csv} with the endpoints of {outcomes_file}: {e}") from None
    centres = np.array([table.cases[case].center for case in scored])
    per_centre = {}
    for centre in sorted(set(centres)):
        m = centres == centre
        per_centre[centre] = {"n_cases": int(m.sum()), "n_events": int(event[m].sum()),
                              "c_index": _concordance(risk[m], time[m], event[m])}
    report = SurvivalReport(risks_csv=str(risks_csv), outcomes=str(outcomes_file), out_dir=str(out_dir),
                            n_cases=len(scored), n_events=int(event.sum()), c_index=c, c_index_ci95=ci,
                            n_resamples=n_resamples, logrank_p=p, left_out=left_out, per_centre=per_centre)
    text = json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n"
    _write_atomically({out_dir / REPORT_FILE: text.encode(), out_dir / PLOT_FILE: png})
    return report


def _read_risks(path: Path) -> dict[str, float]:
    """case -> risk from a CSV with columns `case` and `risk` (others ignored); every malformed row is an error
    naming the file and line, since a silently dropped case would change the C-index."""
    if not path.is_file():
        raise InputDataError(f"{path}: the risk CSV does not exist" if not path.exists()
                             else f"{path}: is not a file; give the risk CSV")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputDataError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise InputDataError(f"{path}: cannot be read ({e.strerror or e})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None:
        raise InputDataError(f"{path}: empty file; expected a CSV with the columns case,risk")
    missing = [c for c in ("case", "risk") if c not in reader.fieldnames]
    if missing:
        raise InputDataError(f"{path}: no column {' or '.join(missing)} in the header "
                             f"{','.join(str(f) for f in reader.fieldnames)}; expected the columns case,risk")
    risks: dict[str, float] = {}
    first_line: dict[str, int] = {}
    try:
        for row in reader:
            line = reader.line_num
            case = (row["case"] or "").strip()
            if not case:
                raise InputDataError(f"{path} line {line}: empty case id")
            if case in risks:
                raise InputDataError(f"{path} line {line}: case {case} appears again (first on line "
                                     f"{first_line[case]})")
            value = row["risk"]
            if value is None or not value.strip():
                raise InputDataError(f"{path} line {line} (case {case}): no risk value")
            try:
                risk = float(value)
            except ValueError:
                risk = math.nan
            if not math.isfinite(risk):
                raise InputDataError(f"{path} line {line} (case {case}): risk {value!r} is not a finite number")
            risks[case], first_line[case] = risk, line
    except csv.Error as e:
        raise InputDataError(f"{path} line {reader.line_num}: not valid CSV ({e})") from None
    if not risks:
        raise InputDataError(f"{path}: no cases below the header")
    return risks


def _concordance(risk: np.ndarray, time: np.ndarray, event: np.ndarray) -> float | None:
    """lifelines' C-index of checked arrays; None without a comparable pair (lifelines raises
    ZeroDivisionError then)."""
    try:
        return float(concordance_index(time, -risk, event))
    except ZeroDivisionError:
        return None


def _checked_arrays(risk: np.ndarray, time: np.ndarray, event: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    arrays = {name: np.asarray(a, dtype=float) for name, a in (("risk", risk), ("time", time), ("event", event))}
    if any(a.ndim != 1 for a in arrays.values()) or len({len(a) for a in arrays.values()}) != 1:
        shapes = ", ".join(f"{name} {a.shape}" for name, a in arrays.items())
        raise InputDataError(f"risk, time and event must be 1-D and of the same length ({shapes})")
    for name, a in arrays.items():
        if not np.isfinite(a).all():
            raise InputDataError(f"{name} holds {int((~np.isfinite(a)).sum())} non-finite values (NaN or infinite)")
    risk, time, event = arrays.values()
    if not np.isin(event, (0, 1)).all():
        bad = ", ".join(f"{v:g}" for v in np.unique(event[~np.isin(event, (0, 1))]))
        raise InputDataError(f"event holds values other than 0 and 1: {bad}")
    if not event.any():
        raise InputDataError(f"no event among the {len(event)} cases; the C-index needs at least one")
    return risk, time, event


def _kaplan_meier(risk: np.ndarray, time: np.ndarray, event: np.ndarray, title: str) -> tuple[float, bytes]:
    """Log-rank p-value of the risk halves and the PNG bytes of their Kaplan-Meier plot (nothing written)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from lifelines import KaplanMeierFitter
    from lifelines.plotting import add_at_risk_counts
    from lifelines.statistics import logrank_test

    median = float(np.median(risk))
    high = risk > median
    if not high.any():
        raise InputDataError(f"no risk lies above the median {median:g} of the {len(risk)} cases, so there is no "
                             "high-risk half for the Kaplan-Meier curves")
    low = ~high
    p = float(logrank_test(time[low], time[high], event[low], event[high]).p_value)
    fig, ax = plt.subplots(figsize=(7, 5.5))
    try:
        fitters = []
        for mask, name in ((low, "low risk"), (high, "high risk")):
            kmf = KaplanMeierFitter().fit(time[mask], event[mask], label=f"{name} (n = {int(mask.sum())})")
            kmf.plot_survival_function(ax=ax, ci_show=True)
            fitters.append(kmf)
        ax.legend(loc="best")
        ax.set_xlabel("days")
        ax.set_ylabel("relapse-free survival")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{title}\nlog-rank p = {p:.3g} (halves split at the median risk {median:.3g})", fontsize=10)
        add_at_risk_counts(*fitters, ax=ax, labels=["low risk", "high risk"], rows_to_show=["At risk"])
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=120)
    finally:
        plt.close(fig)
    return p, buffer.getvalue()


def _write_atomically(files: Mapping[Path, bytes]) -> None:
    """Write every file to a temporary sibling first and rename them into place only when all are written (the
    temporary files are opened normally, not by mkstemp, so the reports get the umask's permissions, not 0600)."""
    staged: dict[Path, Path] = {}
    try:
        for path, data in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            staged[path] = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(staged[path], "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for path, tmp in staged.items():
            os.replace(tmp, path)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)


def _list(ids: list[str]) -> str:
    return ", ".join(ids[:_MAX_LISTED]) + (f", ... ({len(ids) - _MAX_LISTED} more)" if len(ids) > _MAX_LISTED else "")
