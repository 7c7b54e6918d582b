"""The paper's claims, checked on Table 2 rows (one run, or the means of several): one line each, saying
plainly whether it holds.

The tolerances differ between the demo (one run, 6 validation cases per stage) and the multi-seed benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from nnunetv2_pemma.experiments.table2 import ADAPTATION, BEFORE, cell


@dataclass(frozen=True)
class Claim:
    text: str
    holds: bool | None  # None: a measurement to report, not a pass/fail claim
    detail: str

    def __str__(self) -> str:
        verdict = {True: "HOLDS", False: "DOES NOT HOLD", None: "MEASURED"}[self.holds]
        return f"[{verdict}] {self.text}: {self.detail}"


@dataclass(frozen=True)
class Tolerances:
    cp_vs_early_fusion: float  # PEMMA's adaptation-stage CP tumour Dice at most this far below early fusion's
    single_vs_early_fusion: dict[str, float]  # per single-modality input (C, P), the same
    kept_fraction: float = 0.8  # share of its P-inference Dice PEMMA keeps through a CT-only update
    base_gtvp: float = 0.3  # the CT base's validation GTVp Dice must exceed this, and its GTVn Dice 0


DEMO = Tolerances(cp_vs_early_fusion=0.1, single_vs_early_fusion={"P": 0.15})
BENCHMARK = Tolerances(cp_vs_early_fusion=0.05, single_vs_early_fusion={"C": 0.1, "P": 0.1})


def _f(value: float) -> str:
    return "–" if np.isnan(value) else f"{value:.2f}"


def base_claim(base_dice: dict[str, float] | None, tol: Tolerances) -> Claim:
    text = f"the CT base learned CT (validation GTVp Dice > {tol.base_gtvp}, GTVn Dice > 0)"
    if base_dice is None:
        return Claim(text, None, "no validation summary of the CT base")
    gtvp, gtvn = base_dice.get("GTVp", np.nan), base_dice.get("GTVn", np.nan)
    return Claim(text, bool(gtvp > tol.base_gtvp and gtvn > 0), f"GTVp {_f(gtvp)}, GTVn {_f(gtvn)}")


def cp_beats_c(rows: Sequence[dict], method: str) -> Claim:
    """CP inference beats C inference (tumour Dice) in every trained column of a method."""
    columns = list(dict.fromkeys((r["stage"], r["train"]) for r in rows if r["method"] == method
                                 and r["train"] != BEFORE))
    pairs = [(c, cell(rows, method, *c, "CP", "Tumor"), cell(rows, method, *c, "C", "Tumor")) for c in columns]
    pairs = [(c, cp, ct) for c, cp, ct in pairs if not (np.isnan(cp) or np.isnan(ct))]
    detail = "; ".join(f"{s} train {t}: {_f(cp)} vs {_f(ct)}" for (s, t), cp, ct in pairs)
    holds = all(cp > ct for _, cp, ct in pairs) if pairs else None
    return Claim(f"{method}: CP beats C", holds, detail or "no CP/C pair")


def pemma_close_to_early_fusion(rows: Sequence[dict], infer: str, tolerance: float) -> Claim:
    """PEMMA's adaptation-stage tumour Dice with `infer` input is at most `tolerance` below early fusion's."""
    pemma = cell(rows, "PEMMA", ADAPTATION, "CP", infer, "Tumor")
    early = cell(rows, "Early fusion", ADAPTATION, "CP", infer, "Tumor")
    holds = None if np.isnan(pemma) or np.isnan(early) else bool(pemma >= early - tolerance)
    return Claim(f"PEMMA's {infer} tumour Dice within {tolerance} of early fusion's at the adaptation stage", holds,
                 f"PEMMA {_f(pemma)} vs early fusion {_f(early)}")


def no_forgetting(rows: Sequence[dict], stage: str, tol: Tolerances) -> Claim:
    """After the CT-only update on a new centre, PEMMA keeps `kept_fraction` of its P-inference tumour Dice (on
    that centre's validation cases, against the adaptation-stage model), while early fusion's falls."""
    def p_dice(method: str, train: str) -> float:
        return cell(rows, method, stage, train, "P", "Tumor")

    pemma_before, pemma_after = p_dice("PEMMA", BEFORE), p_dice("PEMMA", "C")
    early_before, early_after = p_dice("Early fusion", BEFORE), p_dice("Early fusion", "C")
    values = [pemma_before, pemma_after, early_before, early_after]
    holds = None if np.isnan(values).any() else bool(
        pemma_after >= tol.kept_fraction * pemma_before and early_after < early_before)
    return Claim(f"{stage}: after the CT-only update PEMMA keeps >= {tol.kept_fraction:.0%} of its P-inference "
                 f"Dice while early fusion's falls", holds,
                 f"PEMMA {_f(pemma_before)} -> {_f(pemma_after)}, early fusion {_f(early_before)} -> "
                 f"{_f(early_after)}")


def parameter_claim(trainable_fraction: float | None) -> Claim:
    detail = "not measured" if trainable_fraction is None else f"{trainable_fraction:.2%} of the base"
    return Claim("PEMMA's trainable parameters in the adaptation stage", None, detail)


def check_claims(rows: Sequence[dict], tol: Tolerances, base_dice: dict[str, float] | None = None,
                 trainable_fraction: float | None = None) -> list[Claim]:
    """Every claim the rows can speak to, in the order the README lists them."""
    claims = [base_claim(base_dice, tol)]
    claims += [cp_beats_c(rows, m) for m in ("PEMMA", "Early fusion", "Late fusion")
               if any(r["method"] == m for r in rows)]
    claims.append(pemma_close_to_early_fusion(rows, "CP", tol.cp_vs_early_fusion))
    claims += [pemma_close_to_early_fusion(rows, i, t) for i, t in tol.single_vs_early_fusion.items()]
    stages = dict.fromkeys(r["stage"] for r in rows if r["train"] == BEFORE)
    claims += [no_forgetting(rows, s, tol) for s in stages]
    claims.append(parameter_claim(trainable_fraction))
    return claims
