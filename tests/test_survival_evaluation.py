"""`pemma evaluate-survival`: C-index (against lifelines and a brute-force pair count), bootstrap interval,
Kaplan-Meier log-rank test, the report files and one-line errors for bad inputs. Fast: no training."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from lifelines.statistics import logrank_test
from lifelines.utils import concordance_index

from nnunetv2_pemma.cli import main
from nnunetv2_pemma.data.outcomes import CLINICAL_FEATURES, CaseOutcome, Outcomes, write_outcomes
from nnunetv2_pemma.errors import InputDataError, PemmaError
from nnunetv2_pemma.evaluation.survival import (SurvivalReport, bootstrap_interval, evaluate_survival, harrell_c,
                                                kaplan_meier_png)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def harrell_by_pairs(risk, time, event) -> float:
    """Harrell's C counted pair by pair (higher risk = earlier event), with lifelines' rules for ties: i before j
    is comparable when i is an event and either i's time is earlier, or both times are equal and j is censored
    (it outlived i's event); two events at one time are not comparable; tied risks count 1/2."""
    concordant = pairs = 0.0
    for i in range(len(risk)):
        for j in range(len(risk)):
            if event[i] and (time[i] < time[j] or (time[i] == time[j] and not event[j])):
                pairs += 1
                concordant += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return concordant / pairs


def simulated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Proportional hazards in the risk, uniform censoring, times rounded to whole days (ties)."""
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=n)
    relapse = rng.exponential(500 * np.exp(-risk))
    censor = rng.uniform(100, 1500, n)
    return risk, np.ceil(np.minimum(relapse, censor)), (relapse <= censor).astype(int)


# --- C-index ---------------------------------------------------------------------------------------------------


def test_harrell_c_equals_lifelines_and_a_pair_count_with_ties_and_censoring() -> None:
    # A, B: events at day 2 (not comparable with each other); C censored at day 2 (comparable with A and B);
    # B and C, D and F tie in risk. Pairs: AC AD AE AF 1+1+1+1, BC 1/2, BD 0, BE 1, BF 0, DE 1, DF 1/2 -> 7 / 10.
    risk = np.array([0.9, 0.5, 0.5, 0.7, 0.1, 0.7])
    time = np.array([2, 2, 2, 5, 8, 9])
    event = np.array([1, 1, 0, 1, 0, 1])
    assert harrell_by_pairs(risk, time, event) == pytest.approx(0.7)
    assert harrell_c(risk, time, event) == pytest.approx(0.7)
    assert concordance_index(time, -risk, event) == pytest.approx(0.7)

    risk, time, event = simulated(80, seed=1)
    risk = np.round(risk, 1)  # tied risks too
    assert harrell_c(risk, time, event) == pytest.approx(harrell_by_pairs(risk, time, event), abs=1e-12)
    assert harrell_c(risk, time, event) == pytest.approx(concordance_index(time, -risk, event), abs=1e-12)


def test_a_higher_risk_means_an_earlier_event() -> None:
    time = np.array([10.0, 20, 30, 40, 50])
    event = np.array([1, 1, 0, 1, 1])
    assert harrell_c(np.array([5.0, 4, 3, 2, 1]), time, event) == 1.0
    assert harrell_c(np.array([1.0, 2, 3, 4, 5]), time, event) == 0.0


@pytest.mark.parametrize("risk, time, event, message", [
    ([1, 2], [1, 2, 3], [1, 0, 1], "risk, time and event must be 1-D and of the same length (risk (2,), time (3,), "
                                   "event (3,))"),
    ([1, np.nan, 2], [1, 2, 3], [1, 0, 1], "risk holds 1 non-finite values (NaN or infinite)"),
    ([1, 2, 3], [1, np.inf, 3], [1, 0, 1], "time holds 1 non-finite values (NaN or infinite)"),
    ([1, 2, 3], [1, 2, 3], [1, 2, 1], "event holds values other than 0 and 1: 2"),
    ([1, 2, 3], [1, 2, 3], [0, 0, 0], "no event among the 3 cases; the C-index needs at least one"),
    ([1, 2, 3], [5, 5, 5], [1, 1, 1], "no comparable pair among the 3 cases (events: 3): a pair needs an event "
                                      "before the other case's event or censoring time"),
    ([1, 2], [1, 5], [0, 1], "no comparable pair among the 2 cases (events: 1): a pair needs an event before the "
                             "other case's event or censoring time"),
])
def test_harrell_c_refuses_unusable_arrays(risk, time, event, message: str) -> None:
    with pytest.raises(InputDataError) as info:
        harrell_c(np.array(risk, dtype=float), np.array(time, dtype=float), np.array(event, dtype=float))
    assert str(info.value) == message


# --- bootstrap -------------------------------------------------------------------------------------------------


def test_bootstrap_interval_holds_the_estimate_narrows_with_cases_and_repeats_with_its_seed() -> None:
    small, large = simulated(40, seed=2), simulated(400, seed=3)
    low, high = bootstrap_interval(*small, n_resamples=300, seed=0)
    assert low < harrell_c(*small) < high
    assert bootstrap_interval(*small, n_resamples=300, seed=0) == (low, high)
    assert bootstrap_interval(*small, n_resamples=300, seed=1) != (low, high)
    large_low, large_high = bootstrap_interval(*large, n_resamples=300, seed=0)
    assert large_low < harrell_c(*large) < large_high
    assert large_high - large_low < 0.6 * (high - low)


def test_bootstrap_skips_resamples_without_a_comparable_pair() -> None:
    # 3 cases, one event: about 30% of the resamples lack the event or anything after it
    risk, time, event = np.array([3.0, 2, 1]), np.array([1.0, 2, 3]), np.array([1, 0, 0])
    assert bootstrap_interval(risk, time, event, n_resamples=200) == (1.0, 1.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"n_resamples": 0}, "the number of bootstrap resamples must be at least 1, not 0"),
    ({"level": 95}, "the interval level must lie between 0 and 1, not 95"),
])
def test_bootstrap_settings_are_checked(kwargs: dict, message: str) -> None:
    with pytest.raises(PemmaError) as info:
        bootstrap_interval(*simulated(10, seed=0), **kwargs)
    assert str(info.value) == message


# --- Kaplan-Meier ----------------------------------------------------------------------------------------------


def test_kaplan_meier_png_and_its_log_rank_p(tmp_path: Path) -> None:
    risk, time, event = simulated(60, seed=4)
    path = tmp_path / "km.png"
    p = kaplan_meier_png(risk, time, event, path, "test")
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    import matplotlib.image

    assert matplotlib.image.imread(path).ndim == 3
    high = risk > np.median(risk)
    assert p == logrank_test(time[~high], time[high], event[~high], event[high]).p_value
    assert p < 0.05  # the simulated risk is prognostic
    assert [f.name for f in tmp_path.iterdir()] == ["km.png"]  # no temporary file left


def test_kaplan_meier_needs_a_risk_above_the_median(tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match=r"^no risk lies above the median 2 of the 3 cases, so there is no "
                                             r"high-risk half for the Kaplan-Meier curves$"):
        kaplan_meier_png(np.array([1.0, 2, 2]), np.array([1.0, 2, 3]), np.array([1, 0, 1]), tmp_path / "km.png", "")
    assert not any(tmp_path.iterdir())


# --- evaluate_survival and the CLI -----------------------------------------------------------------------------


def write_outcomes_json(dataset_dir: Path, records: dict[str, tuple[str, int | None, float | None]]) -> Path:
    """outcomes.json through the outcomes module (case -> centre, relapse, RFS days; no clinical rows)."""
    dataset_dir.mkdir(parents=True)
    return write_outcomes(dataset_dir, Outcomes(CLINICAL_FEATURES, {
        case: CaseOutcome(centre, None, relapse, rfs) for case, (centre, relapse, rfs) in records.items()}))


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    """30 cases at two centres (CHUM with events, MDA without) plus 2 without an endpoint, and their risk CSV."""
    risk, time, event = simulated(30, seed=5)
    event[20:] = 0  # MDA's cases are all censored: no per-centre C-index there
    records = {f"CHUM-{i:03d}" if i < 20 else f"MDA-{i:03d}": ("CHUM" if i < 20 else "MDA", int(event[i]),
                                                               float(time[i])) for i in range(30)}
    records.update({"CHUM-100": ("CHUM", None, None), "MDA-100": ("MDA", None, None)})
    outcomes = write_outcomes_json(tmp_path / "Dataset600_HNC", records)
    csv = tmp_path / "risks.csv"
    rows = [f"{case},{float(r)!r},0.5" for case, r in zip(records, [*risk, 0.3, 0.4])]
    csv.write_text("case,risk,fold\n" + "\n".join(rows) + "\n")
    return {"csv": csv, "outcomes": outcomes, "out": tmp_path / "out", "risk": risk, "time": time, "event": event}


def test_evaluate_survival_end_to_end(inputs: dict) -> None:
    risk, time, event, out = inputs["risk"], inputs["time"], inputs["event"], inputs["out"]
    report = evaluate_survival(inputs["csv"], inputs["outcomes"].parent, out, n_resamples=200)
    assert isinstance(report, SurvivalReport)
    assert (report.n_cases, report.n_events, report.left_out) == (30, int(event.sum()), ("CHUM-100", "MDA-100"))
    assert report.c_index == harrell_c(risk, time, event)
    assert report.c_index_ci95 == bootstrap_interval(risk, time, event, n_resamples=200)
    high = risk > np.median(risk)
    assert report.logrank_p == logrank_test(time[~high], time[high], event[~high], event[high]).p_value
    assert report.per_centre == {
        "CHUM": {"n_cases": 20, "n_events": int(event[:20].sum()), "c_index": harrell_c(risk[:20], time[:20],
                                                                                         event[:20])},
        "MDA": {"n_cases": 10, "n_events": 0, "c_index": None}}

    saved = json.loads((out / "survival.json").read_text())
    assert saved == json.loads(json.dumps(report.to_dict()))
    assert (saved["n_cases"], saved["n_left_out"], saved["c_index_ci95"]) == (30, 2, list(report.c_index_ci95))
    assert (out / "kaplan_meier.png").read_bytes().startswith(PNG_SIGNATURE)
    assert sorted(f.name for f in out.iterdir()) == ["kaplan_meier.png", "survival.json"]
    lines = str(report).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"C-index {report.c_index:.2f} (95% CI {report.c_index_ci95[0]:.2f}-"
                               f"{report.c_index_ci95[1]:.2f}) on 30 cases, {int(event.sum())} events; log-rank p = ")
    assert lines[0].endswith(" (low vs high risk halves)")
    assert lines[1] == f"2 cases without an endpoint left out; wrote {out / 'survival.json'} and " \
                       f"{out / 'kaplan_meier.png'}"


def test_cli_prints_the_summary(inputs: dict, capsys: pytest.CaptureFixture) -> None:
    with warnings.catch_warnings():  # the CLI changes how warnings are shown
        code = main(["evaluate-survival", str(inputs["csv"]), "--outcomes", str(inputs["outcomes"]),
                     "--out", str(inputs["out"]), "--bootstrap", "50"])
    assert code == 0
    assert capsys.readouterr().out.startswith("C-index ")
    assert json.loads((inputs["out"] / "survival.json").read_text())["bootstrap_resamples"] == 50


BAD_CSVS = {
    "empty": ("", "{csv}: empty file; expected a CSV with the columns case,risk"),
    "no risk column": ("case,score\nCHUM-000,1\n",
                       "{csv}: no column risk in the header case,score; expected the columns case,risk"),
    "header only": ("case,risk\n", "{csv}: no cases below the header"),
    "duplicate": ("case,risk\nCHUM-000,1\nCHUM-001,2\nCHUM-000,3\n",
                  "{csv} line 4: case CHUM-000 appears again (first on line 2)"),
    "not UTF-8": ("case,risk\nCHUM-000,\xff\n", "{csv}: not a UTF-8 text file (invalid start byte at byte 19)"),
    "not a number": ("case,risk\nCHUM-000,1\nCHUM-001,high\n",
                     "{csv} line 3 (case CHUM-001): risk 'high' is not a finite number"),
    "NaN": ("case,risk\nCHUM-000,nan\n", "{csv} line 2 (case CHUM-000): risk 'nan' is not a finite number"),
    "missing risk": ("case,risk\nCHUM-000\n", "{csv} line 2 (case CHUM-000): no risk value"),
    "blank risk": ("case,risk\nCHUM-000, \n", "{csv} line 2 (case CHUM-000): no risk value"),
    "empty case": ("case,risk\n,1\n", "{csv} line 2: empty case id"),
    "unknown cases": ("case,risk\nCHUM-000,1\nHGJ-001,2\nHGJ-002,3\n",
                      "{csv}: 2 cases are not in the outcomes {outcomes}: HGJ-001, HGJ-002 (a risk CSV of another "
                      "dataset?)"),
    "no endpoint": ("case,risk\nCHUM-100,1\nMDA-100,2\n",
                    "{csv}: none of its 2 cases has an endpoint in {outcomes}"),
    "no event": ("case,risk\nMDA-020,1\nMDA-021,2\n",
                           "{csv} with the endpoints of {outcomes}: no event among the 2 cases; the C-index needs "
                           "at least one"),
}


@pytest.mark.parametrize("name", BAD_CSVS)
def test_bad_risk_csvs_are_one_line_errors_and_write_nothing(inputs: dict, name: str) -> None:
    text, message = BAD_CSVS[name]
    inputs["csv"].write_bytes(text.encode("latin-1"))
    with pytest.raises(InputDataError) as info:
        evaluate_survival(inputs["csv"], inputs["outcomes"], inputs["out"], n_resamples=10)
    assert str(info.value) == message.format(csv=inputs["csv"], outcomes=inputs["outcomes"])
    assert not inputs["out"].exists()


def test_missing_inputs_are_one_line_errors(inputs: dict, tmp_path: Path) -> None:
    cases = [((tmp_path / "none.csv", inputs["outcomes"], inputs["out"]), f"{tmp_path / 'none.csv'}: the risk CSV "
              "does not exist"),
             ((inputs["csv"], tmp_path, inputs["out"]), f"no outcomes.json in {tmp_path}: convert with pemma "
              "convert-hecktor ... --with-outcomes"),
             ((inputs["csv"], inputs["outcomes"], inputs["csv"]), f"{inputs['csv']}: exists and is not a folder; "
              "give the folder to write the report to")]
    for args, message in cases:
        with pytest.raises(InputDataError) as info:
            evaluate_survival(*args, n_resamples=10)
        assert str(info.value) == message
    assert not inputs["out"].exists()


def test_cli_error_is_one_line(inputs: dict, capsys: pytest.CaptureFixture) -> None:
    inputs["csv"].write_text("case,risk\nCHUM-000,1\nCHUM-000,2\n")
    with warnings.catch_warnings():
        code = main(["evaluate-survival", str(inputs["csv"]), "--outcomes", str(inputs["outcomes"]),
                     "--out", str(inputs["out"])])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (f"pemma evaluate-survival: error: {inputs['csv']} line 3: case CHUM-000 appears again "
                   "(first on line 2)\n")
    assert not inputs["out"].exists()
