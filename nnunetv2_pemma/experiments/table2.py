"""Table 2 of the PEMMA paper from scored rows: Markdown, CSV and PNG, for one run or as mean ± std over runs.

A row is one model with one input setting on one stage's validation cases:
{"method", "stage", "train", "infer", "cases", "Tumor", "Lymph", "Avg", "DSCagg"} (Dice values), and after
`aggregate` also "<metric>_std" and "runs".
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

INFER: dict[str, tuple[str, ...]] = {"CP": ("CT", "PET"), "C": ("CT",), "P": ("PET",)}
METHODS = ("Late fusion", "Early fusion", "PEMMA", "PEMMA (drop)", "PEMMA-DoRA", "PEMMA-priors", "PEMMA-MoA")
METRICS = ("Tumor", "Lymph", "Avg")
ADAPTATION = "Multimodal adaptation"
BEFORE = "before"  # train value of rows that score the adaptation-stage model on a new centre, before its update
Column = tuple[str, str]  # (stage, train)


def columns_of(rows: Sequence[dict]) -> list[Column]:
    """The (stage, train) columns the rows hold, the adaptation stage first, then each new stage's
    before-update, C and CP columns."""
    order = {BEFORE: 0, "C": 1, "CP": 2}
    found = list(dict.fromkeys((r["stage"], r["train"]) for r in rows))
    stages = list(dict.fromkeys(s for s, _ in found))
    stages.sort(key=lambda s: (s != ADAPTATION, s))
    return sorted(found, key=lambda c: (stages.index(c[0]), order.get(c[1], 3)))


def column_title(column: Column, infer: str) -> str:
    stage, train = column
    trained = "adaptation-stage model, before the update" if train == BEFORE else f"train {train}"
    return f"{stage} · {trained} · infer {infer}"


def cell(rows: Sequence[dict], method: str, stage: str, train: str, infer: str, metric: str,
         default: float = float("nan")) -> float:
    for r in rows:
        if (r["method"], r["stage"], r["train"], r["infer"]) == (method, stage, train, infer):
            return float(r.get(metric, default))
    return default


def _format(rows: Sequence[dict], method: str, column: Column, infer: str, metric: str) -> str:
    value = cell(rows, method, *column, infer, metric)
    if np.isnan(value):
        return "–"
    std = cell(rows, method, *column, infer, f"{metric}_std")
    return f"{value:.2f}" if np.isnan(std) else f"{value:.2f} ± {std:.2f}"


def table2_markdown(rows: Sequence[dict]) -> str:
    """Methods x (Tumor, Lymph, Avg) Dice, for each stage, training and inference modalities."""
    cols = columns_of(rows)
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    lines = ["| method | Dice | " + " | ".join(column_title(c, i) for c in cols for i in INFER) + " |",
             "|---|---|" + "---|" * (len(cols) * len(INFER))]
    for method in methods:
        for metric in METRICS:
            lines.append(f"| {method} | {metric} | "
                         + " | ".join(_format(rows, method, c, i, metric) for c in cols for i in INFER) + " |")
    return "\n".join(lines)


def aggregate(runs: Sequence[Sequence[dict]]) -> list[dict]:
    """One row per cell with the mean and the standard deviation (ddof=1) over the runs that have it."""
    keys = list(dict.fromkeys((r["method"], r["stage"], r["train"], r["infer"]) for run in runs for r in run))
    out = []
    for key in keys:
        matching = [r for run in runs for r in run if (r["method"], r["stage"], r["train"], r["infer"]) == key]
        row = dict(zip(("method", "stage", "train", "infer"), key), runs=len(matching),
                   cases=int(sum(r["cases"] for r in matching)))
        for metric in (*METRICS, "DSCagg"):
            values = np.array([r[metric] for r in matching], dtype=float)
            values = values[~np.isnan(values)]
            row[metric] = float(values.mean()) if len(values) else float("nan")
            row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        out.append(row)
    return out


def write_table2(rows: Sequence[dict], out: Path, title: str = "PEMMA Table 2 reproduction") -> dict[str, Path]:
    """Table 2 as Markdown, CSV and a PNG: tumour Dice per method and cell, with error bars when the rows hold
    standard deviations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    paths = {"md": out / "table2.md", "csv": out / "table2.csv", "png": out / "table2.png"}
    paths["md"].write_text(table2_markdown(rows) + "\n")
    pd.DataFrame(list(rows)).to_csv(paths["csv"], index=False)
    cols = columns_of(rows)
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    x = np.arange(len(cols) * len(INFER))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(x)), 5))
    for k, method in enumerate(methods):
        means = [cell(rows, method, *c, i, "Tumor") for c in cols for i in INFER]
        stds = [cell(rows, method, *c, i, "Tumor_std") for c in cols for i in INFER]
        ax.bar(x + (k - (len(methods) - 1) / 2) * width, np.nan_to_num(means), width, label=method,
               yerr=None if np.isnan(stds).all() else np.nan_to_num(stds), capsize=2)
    ax.set_xticks(x, [f"{s}\n{'before update' if t == BEFORE else 'train ' + t}\ninfer {i}"
                      for s, t in cols for i in INFER], fontsize=6)
    for boundary in range(len(INFER), len(x), len(INFER)):
        ax.axvline(boundary - 0.5, color="grey", linewidth=0.5)
    ax.set_ylabel("tumour (GTVp) Dice")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    return paths
