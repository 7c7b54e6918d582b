"""The claims check on hand-made rows with per-case Dice: each of HOLDS, FAILS and INCONCLUSIVE reached for every
claim, paired differences matching a direct computation, the bootstrap matching SciPy's, and Table 2's pooling
over runs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import bootstrap

from nnunetv2_pemma.evaluation.intervals import (FAILS, HOLDS, INCONCLUSIVE, MEASURED, Z, Estimate, combine,
                                                 mean_interval, paired_difference, verdict, with_seed_spread)
from nnunetv2_pemma.experiments.claims import BENCHMARK, DEMO, check_claims, spread_key
from nnunetv2_pemma.experiments.seed_spread import (SPREAD_FILE, describe, load_spread, measure_spread,
                                                    record_spread, setting)
from nnunetv2_pemma.experiments.scoring import interval_columns
from nnunetv2_pemma.experiments.table2 import ADAPTATION, BEFORE, aggregate, table2_markdown, updated_on, write_table2

NEW = "New dataset 1"
CASES = 20
NOISE = np.random.default_rng(7).normal(0.0, 0.05, CASES)  # per-case spread shared by every cell


def row(method: str, stage: str, train: str, infer: str, tumour: float, noise: float = 1.0,
        lymph: float = 0.4) -> dict:
    """A cell whose cases scatter around `tumour` with the shared per-case pattern times `noise` (so that two cells
    differ case by case by exactly their means' difference when both have noise 1)."""
    per_case = {f"C-{k:03d}": {"Tumor": float(np.clip(tumour + noise * NOISE[k], 0, 1)), "Lymph": lymph,
                               "Avg": float("nan")} for k in range(CASES)}
    return {"method": method, "stage": stage, "train": train, "infer": infer, "cases": CASES,
            "scored_on": "labelled test cases", **interval_columns(per_case), "DSCagg": tumour, "per_case": per_case}


UPDATED = updated_on(NEW, "C")
LEARNS = "PEMMA: the CT-only update on New dataset 1 learns the new centre (C Dice rises by more than 0.02)"
# the paper's pattern: PEMMA close to early fusion, CP > C, PEMMA's update learns and keeps its PET; early fusion's
# update learns CT and forgets PET
GOOD_PEMMA = {(ADAPTATION, "CP", "CP"): 0.70, (ADAPTATION, "CP", "C"): 0.55, (ADAPTATION, "CP", "P"): 0.60,
              (ADAPTATION, UPDATED, "CP"): 0.70, (ADAPTATION, UPDATED, "C"): 0.55, (ADAPTATION, UPDATED, "P"): 0.60,
              (NEW, BEFORE, "CP"): 0.65, (NEW, BEFORE, "C"): 0.40, (NEW, BEFORE, "P"): 0.50,
              (NEW, "C", "CP"): 0.66, (NEW, "C", "C"): 0.55, (NEW, "C", "P"): 0.50}
GOOD_EARLY = {(ADAPTATION, "CP", "CP"): 0.72, (ADAPTATION, "CP", "C"): 0.50, (ADAPTATION, "CP", "P"): 0.62,
              (ADAPTATION, UPDATED, "CP"): 0.50, (ADAPTATION, UPDATED, "C"): 0.45, (ADAPTATION, UPDATED, "P"): 0.20,
              (NEW, BEFORE, "CP"): 0.70, (NEW, BEFORE, "C"): 0.40, (NEW, BEFORE, "P"): 0.55,
              (NEW, "C", "CP"): 0.62, (NEW, "C", "C"): 0.58, (NEW, "C", "P"): 0.10}
BASE = row("CT base", "Pre-training", "C", "C", 0.6, lymph=0.45)


def table(pemma: dict, early: dict) -> list[dict]:
    return [row("PEMMA", *k, v) for k, v in pemma.items()] + [row("Early fusion", *k, v) for k, v in early.items()]


def verdicts(claims) -> dict[str, str]:
    return {c.text: c.verdict for c in claims}


def test_claims_on_the_papers_pattern() -> None:
    claims = check_claims(table(GOOD_PEMMA, GOOD_EARLY), BENCHMARK, BASE, 0.05)
    found = verdicts(claims)
    expected_fail = "Early fusion: the CT-only update on New dataset 1 forgets nothing (after - before within 0.05)"
    assert found.pop(expected_fail) == FAILS, "early fusion forgets PET: the paper's finding"
    assert found.pop("PEMMA's trainable parameters in the adaptation stage") == MEASURED
    assert set(found.values()) == {HOLDS}, claims
    text = "\n".join(map(str, claims))
    assert "[HOLDS] PEMMA: CP beats C: Multimodal adaptation train CP, CP - C: +0.15 [+0.15, +0.15] (n=20)" in text
    gtvp = mean_interval([c["Tumor"] for c in BASE["per_case"].values()])
    assert f"GTVp: {gtvp.mean:.2f} [{gtvp.low:.2f}, {gtvp.high:.2f}] (n=20); GTVn: 0.45" in text
    assert "on 20 labelled test cases" in text
    assert "5.00% of the base" in str(claims[-1])


# one change per case: the claim it breaks, whether it then fails outright (the whole interval on the wrong side)
# or is inconclusive (the interval straddles the margin: noisier cases)
@pytest.mark.parametrize("change, claim, expected", [
    ({"pemma": {(NEW, "C", "C"): 0.75}}, "PEMMA: CP beats C", FAILS),
    ({"pemma": {(NEW, "C", "C"): 0.70}, "noise": ("PEMMA", (NEW, "C", "C"), 4.0)}, "PEMMA: CP beats C", INCONCLUSIVE),
    ({"early": {(NEW, "C", "CP"): 0.50}}, "Early fusion: CP beats C", FAILS),
    ({"early": {(ADAPTATION, "CP", "CP"): 0.76}, "noise": ("Early fusion", (ADAPTATION, "CP", "CP"), 4.0)},
     "PEMMA's CP tumour Dice within 0.05 of early fusion's at the adaptation stage", INCONCLUSIVE),
    ({"pemma": {(ADAPTATION, "CP", "CP"): 0.60}},
     "PEMMA's CP tumour Dice within 0.05 of early fusion's at the adaptation stage", FAILS),
    ({"pemma": {(ADAPTATION, "CP", "P"): 0.10}},
     "PEMMA's P tumour Dice within 0.1 of early fusion's at the adaptation stage", FAILS),
    ({"pemma": {(NEW, "C", "C"): 0.30}}, LEARNS, FAILS),
    ({"pemma": {(NEW, "C", "C"): 0.41}}, LEARNS, FAILS),  # a rise of 0.01 is not learning
    ({"pemma": {(NEW, "C", "C"): 0.42}, "noise": ("PEMMA", (NEW, "C", "C"), 4.0)}, LEARNS, INCONCLUSIVE),
    ({"pemma": {(ADAPTATION, UPDATED, "P"): 0.40}}, "PEMMA: the CT-only update on New dataset 1 forgets nothing "
                                                    "(after - before within 0.05)", FAILS),
    ({"pemma": {(ADAPTATION, UPDATED, "C"): 0.45}}, "PEMMA: the CT-only update on New dataset 1 forgets nothing "
                                                    "(after - before within 0.05)", FAILS),
    ({"pemma": {(NEW, "C", "P"): 0.40}}, "PEMMA: the CT-only update on New dataset 1 forgets nothing "
                                         "(after - before within 0.05)", FAILS),
    ({"pemma": {(NEW, "C", "P"): 0.45}, "noise": ("PEMMA", (NEW, "C", "P"), 4.0)},
     "PEMMA: the CT-only update on New dataset 1 forgets nothing (after - before within 0.05)", INCONCLUSIVE),
])
def test_each_claim_reaches_each_verdict(change: dict, claim: str, expected: str) -> None:
    pemma, early = dict(GOOD_PEMMA), dict(GOOD_EARLY)
    pemma.update(change.get("pemma", {}))
    early.update(change.get("early", {}))
    rows = table(pemma, early)
    if "noise" in change:
        method, (stage, train, infer), noise = change["noise"]
        index = next(i for i, r in enumerate(rows) if (r["method"], r["stage"], r["train"], r["infer"])
                     == (method, stage, train, infer))
        rows[index] = row(method, stage, train, infer, (pemma if method == "PEMMA" else early)[stage, train, infer],
                          noise=noise)
    found = verdicts(check_claims(rows, BENCHMARK, BASE))
    assert found[claim] == expected, found
    changed = {t for t, v in found.items() if v != verdicts(check_claims(table(GOOD_PEMMA, GOOD_EARLY), BENCHMARK,
                                                                          BASE))[t]}
    assert changed == {claim}, changed


@pytest.mark.parametrize("gtvn, expected", [(0.45, HOLDS), (0.10, FAILS), (0.31, INCONCLUSIVE)])
def test_base_claim(gtvn: float, expected: str) -> None:
    base = row("CT base", "Pre-training", "C", "C", 0.6, lymph=gtvn)
    for k, case in enumerate(base["per_case"]):  # lymph-node Dice that vary by case
        base["per_case"][case]["Lymph"] = float(np.clip(gtvn + 2 * NOISE[k], 0, 1))
    claim = check_claims(table(GOOD_PEMMA, GOOD_EARLY), DEMO, base)[0]
    assert claim.text == "the CT base learned CT (GTVp and GTVn Dice above 0.3)" and claim.verdict == expected, claim
    assert check_claims(table(GOOD_PEMMA, GOOD_EARLY), DEMO)[0].verdict == MEASURED


def test_demo_tolerances() -> None:
    pemma = GOOD_PEMMA | {(ADAPTATION, "CP", "CP"): 0.64}  # 0.08 below early fusion: fails 0.05, holds at 0.1
    text = "PEMMA's CP tumour Dice within {} of early fusion's at the adaptation stage"
    assert verdicts(check_claims(table(pemma, GOOD_EARLY), DEMO))[text.format(0.1)] == HOLDS
    assert verdicts(check_claims(table(pemma, GOOD_EARLY), BENCHMARK))[text.format(0.05)] == FAILS


def test_paired_difference_uses_the_shared_cases_and_scipy() -> None:
    rng = np.random.default_rng(3)
    a = {f"c{k}": float(v) for k, v in enumerate(rng.random(30))}
    b = {f"c{k}": float(v) for k, v in enumerate(rng.random(30)) if k != 4} | {"other": 0.5, "c7": math.nan}
    shared = sorted(set(a) & set(b) - {"c7"})
    diff = paired_difference(a, b)
    assert diff.n == len(shared) == 28
    values = np.array([a[c] - b[c] for c in shared])
    assert math.isclose(diff.mean, values.mean())
    reference = bootstrap((values,), np.mean, n_resamples=2000, method="percentile",
                          rng=np.random.default_rng(0)).confidence_interval
    assert (diff.low, diff.high) == pytest.approx((reference.low, reference.high))
    assert diff.low < diff.mean < diff.high
    assert paired_difference(a, b) == diff, "a fixed generator: the same interval every time"


def test_interval_edge_cases_and_verdicts() -> None:
    assert math.isnan(mean_interval([]).mean) and mean_interval([math.nan]).n == 0
    one = mean_interval([0.4])
    assert one.mean == 0.4 and math.isnan(one.low) and verdict(one) == INCONCLUSIVE
    same = mean_interval([0.2, 0.2, math.nan])
    assert (same.mean, same.low, same.high, same.n) == (0.2, 0.2, 0.2, 2)
    assert verdict(Estimate(0.1, 0.01, 0.2, 9)) == HOLDS and verdict(Estimate(-0.1, -0.2, -0.01, 9)) == FAILS
    assert verdict(Estimate(0.0, -0.1, 0.1, 9)) == INCONCLUSIVE
    assert verdict(Estimate(-0.02, -0.04, 0.0, 9), margin=0.05) == HOLDS
    assert verdict(Estimate(-0.1, -0.2, -0.06, 9), margin=0.05) == FAILS
    assert combine([HOLDS, HOLDS]) == HOLDS and combine([HOLDS, INCONCLUSIVE]) == INCONCLUSIVE
    assert combine([INCONCLUSIVE, FAILS, HOLDS]) == FAILS and combine([]) == INCONCLUSIVE


def test_aggregate_pools_cases_over_runs(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    runs = [[row(m, ADAPTATION, "CP", i, float(rng.random())) for m in ("PEMMA", "Early fusion")
             for i in ("CP", "C", "P")] for _ in range(3)]
    rows = aggregate(runs)
    assert len(rows) == 6 and all(r["runs"] == 3 and r["cases"] == 3 * CASES for r in rows)
    tumours = [run[0]["Tumor"] for run in runs]
    assert math.isclose(rows[0]["Tumor"], np.mean(tumours))
    assert math.isclose(rows[0]["Tumor_std"], np.std(tumours, ddof=1))
    assert len(rows[0]["per_case"]) == 3 * CASES and "run2/C-019" in rows[0]["per_case"]
    pooled = mean_interval([s["Tumor"] for s in rows[0]["per_case"].values()])
    assert (rows[0]["Tumor_low"], rows[0]["Tumor_high"]) == (pooled.low, pooled.high)
    assert f"{rows[0]['Tumor']:.2f} ± {rows[0]['Tumor_std']:.2f} [" in table2_markdown(rows)
    paths = write_table2(rows, tmp_path)
    assert "Tumor_std" in paths["csv"].read_text().splitlines()[0]


def test_seed_spread_widens_the_interval() -> None:
    wide = with_seed_spread(Estimate(0.10, 0.06, 0.16, 20), 0.05)
    assert wide.mean == 0.10 and wide.n == 20
    assert wide.low == pytest.approx(0.10 - math.hypot(0.04, Z * 0.05))
    assert wide.high == pytest.approx(0.10 + math.hypot(0.06, Z * 0.05))
    assert Z == pytest.approx(1.959964, abs=1e-6)
    assert with_seed_spread(Estimate(0.1, 0.0, 0.2, 9), 0.0) == Estimate(0.1, 0.0, 0.2, 9)


def test_a_claim_another_seed_could_overturn_is_inconclusive() -> None:
    """PEMMA's CP 0.08 below early fusion's: FAILS the 0.05 tolerance on the cases alone; with a measured seed
    spread of 0.05 the interval reaches above -0.05, so INCONCLUSIVE; a small spread leaves it FAILS."""
    rows = table(GOOD_PEMMA | {(ADAPTATION, "CP", "CP"): 0.64}, GOOD_EARLY)
    text = "PEMMA's CP tumour Dice within 0.05 of early fusion's at the adaptation stage"
    key = spread_key(text, "PEMMA - early fusion")
    assert verdicts(check_claims(rows, BENCHMARK, BASE))[text] == FAILS
    assert verdicts(check_claims(rows, BENCHMARK, BASE, spread={key: 0.005}))[text] == FAILS
    claims = check_claims(rows, BENCHMARK, BASE, spread={key: 0.05})
    claim = next(c for c in claims if c.text == text)
    assert claim.verdict == INCONCLUSIVE and "with the seed spread (sd 0.05) [-0.18, +0.02]" in claim.detail, claim
    assert claim.parts[0][1].mean == pytest.approx(-0.08)
    # a spread elsewhere changes nothing here; the base claim takes its own
    base = next(c for c in check_claims(rows, BENCHMARK, BASE, spread={key: 0.05}) if c.text.startswith("the CT"))
    assert base.verdict == HOLDS
    lymph = spread_key(base.text, "GTVn")
    assert next(c for c in check_claims(rows, BENCHMARK, BASE, spread={lymph: 0.1})
                if c.text.startswith("the CT")).verdict == INCONCLUSIVE


def test_measure_record_and_load_the_spread(tmp_path: Path) -> None:
    """The spread of a difference is its standard deviation over the seeds' runs (n - 1), recorded per setting."""
    runs = [table(GOOD_PEMMA | {(ADAPTATION, "CP", "CP"): v}, GOOD_EARLY) for v in (0.70, 0.62, 0.66)]
    spread = measure_spread([check_claims(run, DEMO, BASE) for run in runs])
    key = spread_key("PEMMA's CP tumour Dice within 0.1 of early fusion's at the adaptation stage",
                     "PEMMA - early fusion")
    assert spread[key] == pytest.approx(np.std([-0.02, -0.10, -0.06], ddof=1), abs=1e-4)
    assert spread[spread_key("PEMMA: CP beats C", "Multimodal adaptation train CP, CP - C")] == pytest.approx(
        np.std([0.15, 0.07, 0.11], ddof=1), abs=1e-4)
    assert spread[spread_key("Early fusion: CP beats C", "Multimodal adaptation train CP, CP - C")] == 0.0
    path = tmp_path / "spread.json"
    assert load_spread("phantom/demo/demo", path) == {} and "test cases alone" in describe("phantom/demo/demo", path)
    record_spread("phantom/demo/demo", spread, [0, 1, 2], "python benchmarks/table2_phantom.py", path)
    record_spread("hecktor/paper/full", {"x": 0.1}, [0, 1], "elsewhere", path)
    assert load_spread("phantom/demo/demo", path) == spread and load_spread("hecktor/paper/full", path) == {"x": 0.1}
    assert "seeds 0, 1, 2" in describe("phantom/demo/demo", path)
    assert measure_spread([check_claims(runs[0], DEMO, BASE)]) == {}, "one seed has no spread"


def test_the_recorded_demo_spread_covers_the_demos_claims() -> None:
    """The package's record for `pemma demo` (phantom, demo preset, demo scope) has a spread for every difference
    the demo's claims compare: a renamed claim would otherwise lose its spread without a word."""
    spread = load_spread(setting(True, "demo", "demo"))
    assert spread, f"no demo spread recorded in {SPREAD_FILE}"
    late = [row("Late fusion", *k, v) for k, v in GOOD_PEMMA.items()]
    keys = {spread_key(c.text, label) for c in check_claims(table(GOOD_PEMMA, GOOD_EARLY) + late, DEMO, BASE)
            for label, _ in c.parts}
    assert keys <= set(spread), keys - set(spread)
