"""The paper's claims, decided on Table 2 rows with per-case Dice: HOLDS, FAILS or INCONCLUSIVE, each with the
difference it rests on and that difference's 95 % paired bootstrap interval over the cases (`evaluation.intervals`).

A claim that compares two cells (CP against C; PEMMA against early fusion; after an update against before it)
takes the per-case differences of the cases both cells scored. Where the seed-to-seed spread of a difference has
been measured (`experiments.seed_spread`, by benchmarks/table2_phantom.py), its interval is widened by that spread:
a claim that another seed could overturn comes out INCONCLUSIVE instead of flipping between HOLDS and FAILS from
one run to the next.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from nnunetv2_pemma.evaluation.intervals import (MEASURED, Estimate, combine, mean_interval, paired_difference,
                                                 verdict, with_seed_spread)
from nnunetv2_pemma.experiments.table2 import ADAPTATION, BEFORE, UPDATED, find, updated_on

METRIC = "Tumor"  # the claims speak of tumour (GTVp) Dice, as the paper's text does


Spread = Mapping[str, float]  # spread_key(claim, part) -> standard deviation of that difference between seeds


def spread_key(text: str, label: str) -> str:
    """Where a claim's compared difference finds its seed spread."""
    return f"{text} | {label}"


@dataclass(frozen=True)
class Claim:
    text: str
    verdict: str  # HOLDS, FAILS, INCONCLUSIVE, or MEASURED (a figure to report, not a claim)
    detail: str
    parts: tuple[tuple[str, Estimate], ...] = ()  # the differences it rests on, over the cases alone

    def __str__(self) -> str:
        return f"[{self.verdict}] {self.text}: {self.detail}"


@dataclass(frozen=True)
class Tolerances:
    cp_vs_early_fusion: float  # PEMMA's adaptation-stage CP tumour Dice at most this far below early fusion's
    single_vs_early_fusion: dict[str, float]  # per single-modality input (C, P), the same
    forgetting: float = 0.05  # an update forgets nothing when no compared Dice falls by more than this
    learning: float = 0.02  # an update learns the new centre when its C Dice there rises by more than this
    base_dice: float = 0.3  # the CT base's GTVp and GTVn Dice on its test cases must exceed this


DEMO = Tolerances(cp_vs_early_fusion=0.1, single_vs_early_fusion={"P": 0.15})
BENCHMARK = Tolerances(cp_vs_early_fusion=0.05, single_vs_early_fusion={"C": 0.1, "P": 0.1})


def _scores(row: dict | None, metric: str = METRIC) -> dict[str, float]:
    return {} if row is None else {case: s[metric] for case, s in row.get("per_case", {}).items()}


def compare(rows: Sequence[dict], a: tuple[str, str, str, str], b: tuple[str, str, str, str]) -> Estimate:
    """Paired difference a - b of two cells (method, stage, train, infer) over the cases both scored."""
    return paired_difference(_scores(find(rows, *a)), _scores(find(rows, *b)))


def _decide(text: str, parts: Sequence[tuple[str, Estimate]], margin: float, spread: Spread,
            spec: str = "+.2f") -> Claim:
    """A claim made of labelled differences, each needing an interval (widened by its seed spread) above -margin."""
    verdicts, described = [], []
    for label, difference in parts:
        sd = spread.get(spread_key(text, label), 0.0)
        wide = with_seed_spread(difference, sd)
        verdicts.append(verdict(wide, margin))
        described.append(f"{label}: {difference.format(spec)}" + (
            f", with the seed spread (sd {sd:.2f}) [{wide.low:{spec}}, {wide.high:{spec}}]" if wide != difference
            else ""))
    return Claim(text, combine(verdicts), "; ".join(described) or "no cells to compare", tuple(parts))


def base_claim(base_row: dict | None, tol: Tolerances, spread: Spread) -> Claim:
    """The CT base segments both classes on its own test cases: each label's mean Dice above `base_dice`."""
    text = f"the CT base learned CT (GTVp and GTVn Dice above {tol.base_dice})"
    if base_row is None:
        return Claim(text, MEASURED, "the CT base was not scored")
    parts = [(label, mean_interval(list(_scores(base_row, metric).values())))
             for label, metric in (("GTVp", "Tumor"), ("GTVn", "Lymph"))]
    claim = _decide(text, parts, -tol.base_dice, spread, spec=".2f")
    return dataclasses.replace(claim, detail=f"{claim.detail} on {base_row['cases']} {base_row['scored_on']}")


def _trained_columns(rows: Sequence[dict], method: str) -> list[tuple[str, str]]:
    return list(dict.fromkeys((r["stage"], r["train"]) for r in rows if r["method"] == method
                              and r["train"] != BEFORE and not r["train"].startswith(UPDATED)))


def cp_beats_c(rows: Sequence[dict], method: str, spread: Spread) -> Claim:
    """CP inference beats C inference (tumour Dice) in every column where the method was trained."""
    parts = [(f"{stage} train {train}, CP - C",
              compare(rows, (method, stage, train, "CP"), (method, stage, train, "C")))
             for stage, train in _trained_columns(rows, method)]
    return _decide(f"{method}: CP beats C", parts, 0.0, spread)


def pemma_close_to_early_fusion(rows: Sequence[dict], infer: str, tolerance: float, spread: Spread) -> Claim:
    """PEMMA's adaptation-stage tumour Dice with `infer` input is at most `tolerance` below early fusion's."""
    difference = compare(rows, ("PEMMA", ADAPTATION, "CP", infer), ("Early fusion", ADAPTATION, "CP", infer))
    return _decide(f"PEMMA's {infer} tumour Dice within {tolerance} of early fusion's at the adaptation stage",
                   [("PEMMA - early fusion", difference)], tolerance, spread)


def update_learns(rows: Sequence[dict], stage: str, method: str, tol: Tolerances, spread: Spread) -> Claim:
    """The CT-only update raises the method's C-inference tumour Dice on the new centre by more than `learning` (a
    rise of a few voxels is not learning, and a margin keeps such a claim from flipping between runs)."""
    difference = compare(rows, (method, stage, "C", "C"), (method, stage, BEFORE, "C"))
    return _decide(f"{method}: the CT-only update on {stage} learns the new centre (C Dice rises by more than "
                   f"{tol.learning})", [("after - before", difference)], -tol.learning, spread)


def no_forgetting(rows: Sequence[dict], stage: str, method: str, tol: Tolerances, spread: Spread) -> Claim:
    """The CT-only update keeps what the model could do: CP and P on the new centre, and CP, C and P on the
    adaptation centre, each within `forgetting` of the adaptation-stage model's Dice."""
    parts = []
    for infer in ("CP", "P"):
        parts.append((f"{stage} {infer}", compare(rows, (method, stage, "C", infer), (method, stage, BEFORE, infer))))
    for infer in ("CP", "C", "P"):
        parts.append((f"{ADAPTATION} {infer}", compare(rows, (method, ADAPTATION, updated_on(stage, "C"), infer),
                                                       (method, ADAPTATION, "CP", infer))))
    parts = [(label, d) for label, d in parts if d.n]
    return _decide(f"{method}: the CT-only update on {stage} forgets nothing (after - before within "
                   f"{tol.forgetting})", parts, tol.forgetting, spread)


def parameter_claim(trainable_fraction: float | None) -> Claim:
    detail = "not measured" if trainable_fraction is None else f"{trainable_fraction:.2%} of the base"
    return Claim("PEMMA's trainable parameters in the adaptation stage", MEASURED, detail)


UPDATE_METHODS = ("PEMMA", "PEMMA-input-skip", "Early fusion")


def check_claims(rows: Sequence[dict], tol: Tolerances, base_row: dict | None = None,
                 trainable_fraction: float | None = None, spread: Spread | None = None) -> list[Claim]:
    """Every claim the rows can speak to, in the order the README lists them; `spread` (`seed_spread`) widens each
    compared difference's interval by its measured seed-to-seed spread (none: intervals over the cases alone)."""
    spread = spread or {}
    present = {r["method"] for r in rows}
    claims = [base_claim(base_row, tol, spread)]
    claims += [cp_beats_c(rows, m, spread) for m in ("PEMMA", "Early fusion", "Late fusion") if m in present]
    claims.append(pemma_close_to_early_fusion(rows, "CP", tol.cp_vs_early_fusion, spread))
    claims += [pemma_close_to_early_fusion(rows, i, t, spread) for i, t in tol.single_vs_early_fusion.items()]
    stages = dict.fromkeys(r["stage"] for r in rows if r["train"] == BEFORE)
    per_stage: list[Callable[[str, str], Claim]] = [lambda s, m: update_learns(rows, s, m, tol, spread),
                                                    lambda s, m: no_forgetting(rows, s, m, tol, spread)]
    claims += [claim(s, m) for s in stages for claim in per_stage for m in UPDATE_METHODS if m in present
               and find(rows, m, s, "C", "C") is not None]
    claims.append(parameter_claim(trainable_fraction))
    return claims
