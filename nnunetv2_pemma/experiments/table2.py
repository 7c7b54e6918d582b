"""Table 2 of the PEMMA paper from scored rows: Markdown, CSV (means and intervals; and every case's Dice) and PNG
(tumour Dice with 95 % intervals), for one run or pooled over runs.

A row is one model with one input setting on one stage's evaluation cases:
{"method", "stage", "train", "infer", "scored_on", "cases", "per_case": {case: {"Tumor", "Lymph", "Avg"}}} with each
metric's mean and bootstrap interval ("<metric>", "<metric>_low", "<metric>_high") and "DSCagg"; after
`aggregate` also "<metric>_std" (over runs) and "runs".
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np

INFER: dict[str, tuple[str, ...]] = {"CP": ("CT", "PET"), "C": ("CT",), "P": ("PET",)}
METHODS = ("Late fusion", "Early fusion", "PEMMA", "PEMMA (drop)", "PEMMA-input-skip", "PEMMA-DoRA", "PEMMA-priors",
           "PEMMA-MoA")
METRICS = ("Tumor", "Lymph", "Avg")
ADAPTATION = "Multimodal adaptation"
BEFORE = "before"  # train value of rows that score the adaptation-stage model on a new centre, before its update
UPDATED = "updated on "  # train values of rows that score an updated model on the adaptation centre
Column = tuple[str, str]  # (stage, train)
KEYS = ("method", "stage", "train", "infer")


def updated_on(stage: str, train: str) -> str:
    """The train value of a model updated on `stage` with `train` data, scored on the adaptation centre."""
    return f"{UPDATED}{stage} with {train}"


def columns_of(rows: Sequence[dict]) -> list[Column]:
    """The (stage, train) columns the rows hold, the adaptation stage first (its own models, then the updated
    ones), then each new stage's before-update, C and CP columns."""
    found = list(dict.fromkeys((r["stage"], r["train"]) for r in rows))
    stages = list(dict.fromkeys(s for s, _ in found))
    stages.sort(key=lambda s: (s != ADAPTATION, s))

    def rank(column: Column) -> tuple[int, int, str]:
        stage, train = column
        if stage == ADAPTATION:
            return stages.index(stage), 0 if train == "CP" else 1, train
        return stages.index(stage), {BEFORE: 0, "C": 1, "CP": 2}.get(train, 3), train

    return sorted(found, key=rank)


def model_title(column: Column) -> str:
    stage, train = column
    if train == BEFORE:
        return "adaptation-stage model, before the update"
    if train.startswith(UPDATED):
        return f"model {train}"
    return f"train {train}"


def column_title(column: Column, infer: str) -> str:
    return f"{column[0]} · {model_title(column)} · infer {infer}"


def cell(rows: Sequence[dict], method: str, stage: str, train: str, infer: str, metric: str,
         default: float = float("nan")) -> float:
    row = find(rows, method, stage, train, infer)
    return default if row is None else float(row.get(metric, default))


def find(rows: Sequence[dict], method: str, stage: str, train: str, infer: str) -> dict | None:
    return next((r for r in rows if (r["method"], r["stage"], r["train"], r["infer"]) == (method, stage, train, infer)),
                None)


def format_cell(row: dict | None, metric: str) -> str:
    """Mean [95 % interval] (and ± std over runs after `aggregate`)."""
    if row is None or np.isnan(row.get(metric, np.nan)):
        return "–"
    text = f"{row[metric]:.2f}"
    std = row.get(f"{metric}_std", np.nan)
    if not np.isnan(std):
        text += f" ± {std:.2f}"
    low, high = row.get(f"{metric}_low", np.nan), row.get(f"{metric}_high", np.nan)
    return text + ("" if np.isnan(low) else f" [{low:.2f}, {high:.2f}]")


def table2_markdown(rows: Sequence[dict]) -> str:
    """Per metric (tumour, lymph nodes) a table: one line per stage, model and inference input, one column per
    method; each cell the mean Dice over the cases with its 95 % bootstrap interval."""
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    parts = []
    for metric, name in (("Tumor", "Tumour (GTVp) Dice"), ("Lymph", "Lymph-node (GTVn) Dice")):
        lines = [f"{name}, mean [95 % bootstrap interval over cases]:", "",
                 "| stage | model | infer | cases | " + " | ".join(methods) + " |",
                 "|---|---|---|---|" + "---|" * len(methods)]
        for stage, train in columns_of(rows):
            for infer in INFER:
                found = [find(rows, m, stage, train, infer) for m in methods]
                if not any(found):
                    continue
                first = next(r for r in found if r is not None)
                lines.append(f"| {stage} | {model_title((stage, train))} | {infer} | {first['cases']} "
                             f"{first.get('scored_on', '')} | " + " | ".join(format_cell(r, metric) for r in found)
                             + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def aggregate(runs: Sequence[Sequence[dict]]) -> list[dict]:
    """One row per cell over runs: the mean of the runs' means and their standard deviation (ddof=1), and the
    cases of every run pooled (named "run<k>/<case>") with their bootstrap interval."""
    from nnunetv2_pemma.experiments.scoring import interval_columns

    keys = list(dict.fromkeys(tuple(r[k] for k in KEYS) for run in runs for r in run))
    out = []
    for key in keys:
        matching = [(k, r) for k, run in enumerate(runs) for r in run if tuple(r[x] for x in KEYS) == key]
        per_case = {f"run{k}/{case}": scores for k, r in matching for case, scores in r.get("per_case", {}).items()}
        row = dict(zip(KEYS, key), runs=len(matching), cases=int(sum(r["cases"] for _, r in matching)),
                   scored_on=matching[0][1].get("scored_on", ""), per_case=per_case)
        if per_case:
            row |= interval_columns(per_case)
        for metric in (*METRICS, "DSCagg"):
            values = np.array([r[metric] for _, r in matching], dtype=float)
            values = values[~np.isnan(values)]
            row[metric] = float(values.mean()) if len(values) else float("nan")
            row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        out.append(row)
    return out


def write_table2(rows: Sequence[dict], out: Path, title: str = "PEMMA Table 2 reproduction") -> dict[str, Path]:
    """Table 2 as Markdown, CSV (one line per row, without the cases), a CSV of every case's Dice
    (table2_cases.csv) and a PNG: tumour Dice per method and cell with its 95 % interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    paths = {"md": out / "table2.md", "csv": out / "table2.csv", "cases": out / "table2_cases.csv",
             "png": out / "table2.png"}
    paths["md"].write_text(table2_markdown(rows) + "\n")
    pd.DataFrame([{k: v for k, v in r.items() if k != "per_case"} for r in rows]).to_csv(paths["csv"], index=False)
    pd.DataFrame([{**{k: r[k] for k in KEYS}, "case": case, **scores} for r in rows
                  for case, scores in r.get("per_case", {}).items()]).to_csv(paths["cases"], index=False)
    cols = columns_of(rows)
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    x = np.arange(len(cols) * len(INFER))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(x)), 5))
    for k, method in enumerate(methods):
        found = [find(rows, method, *c, i) for c in cols for i in INFER]
        means = np.array([np.nan if r is None else r["Tumor"] for r in found], dtype=float)
        lows = np.array([np.nan if r is None else r.get("Tumor_low", np.nan) for r in found], dtype=float)
        highs = np.array([np.nan if r is None else r.get("Tumor_high", np.nan) for r in found], dtype=float)
        errors = np.nan_to_num(np.stack([means - lows, highs - means]))
        ax.bar(x + (k - (len(methods) - 1) / 2) * width, np.nan_to_num(means), width, label=method,
               yerr=None if np.isnan(lows).all() else errors, capsize=2)
    ax.set_xticks(x, [textwrap.fill(f"{s}, {model_title((s, t))}", 24) + f"\ninfer {i}"
                      for s, t in cols for i in INFER], fontsize=5)
    for boundary in range(len(INFER), len(x), len(INFER)):
        ax.axvline(boundary - 0.5, color="grey", linewidth=0.5)
    cases = sorted({(r["cases"], r.get("scored_on", "")) for r in rows})
    ax.set_ylabel("tumour (GTVp) Dice, 95 % bootstrap interval")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"{title}\n(cases per cell: {', '.join(f'{n} {kind}'.strip() for n, kind in cases)})", fontsize=9)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    return paths
