"""`pemma compare`: PEMMA beside the peer networks a user would weigh against it, on the same data, split, fold and
metrics (the peer table).

Every row trains on the adaptation stage's CT+PET dataset (dataset 502, the paper's adaptation centre MDA) and is
scored on its fold-0 validation cases, as in `pemma reproduce`:

- nnU-Net's own 3d_fullres U-Net on both channels, UNETR early fusion and PEMMA (both from the CT base trained on
  the pre-training centres), H2ASeg and the 2.5D slice-interaction network, each from scratch;
- the CNN forms on nnU-Net's U-Net: the U-Net from scratch with channel dropout, and PEMMA and early fusion from a
  CT base of nnU-Net's own U-Net trained on the pre-training centres (the "unet" preset of the same size);
- the 2.5D network's transfer-learning recipe: pre-trained on the pre-training centres' CT+PET (dataset 504), then
  fine-tuned on 502 (`SliceInteractionFineTuningTrainer`), next to its from-scratch row.

Per row and input (CP, C and P: every network takes an absent modality as a zero image or skips its slot): Dice, HD95,
precision and recall per class (`evaluation.metrics`), trainable and total parameters, and the inference time per
case of `pemma predict`'s path (nnU-Net's predictor in this process, preprocessing and export included). Training
step time and peak memory are measured for the same networks in one run by `benchmarks/peer_table.py`, which
writes the full peer table from this module's rows.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from nnunetv2_pemma.experiments.protocol import PRETRAINING, Protocol
from nnunetv2_pemma.experiments.scheduler import Job, success_marker
from nnunetv2_pemma.experiments.table2 import ADAPTATION, INFER
from nnunetv2_pemma.plans import load_preset

LABELS = {"GTVp": 1, "GTVn": 2}
METRICS = ("dice", "hd95_mm", "precision", "recall")
PRETRAINING_CTPET = 504  # the pre-training centres with PET: the 2.5D network's source task
CNN_BASE_TRAINER = "nnUNetPresetTrainer"  # nnU-Net's own U-Net on the pre-training centres' CT: the CNN forms' base


@dataclass(frozen=True)
class Row:
    """One trained model of the peer table."""

    name: str
    kind: str  # preset kind: "unetr" (the reproduction's own preset), "unet", "h2aseg", "slices25d"
    trainer: str
    dataset: int
    infers: tuple[str, ...] = ("CP", "C", "P")
    from_cnn_base: bool = False  # starts from the CT base of nnU-Net's U-Net (the "unet" preset, on 501)


ROWS = (
    Row("nnU-Net 3d_fullres U-Net", "unet", "nnUNetPresetTrainer", 502),
    Row("nnU-Net U-Net, channel dropout", "unet", "nnUNetChannelDropoutTrainer", 502),
    Row("nnU-Net early fusion", "unet", "EarlyFusionCNNTrainer", 502, from_cnn_base=True),
    Row("PEMMA on nnU-Net's U-Net", "unet", "PEMMACNNTrainer", 502, from_cnn_base=True),
    Row("UNETR early fusion", "unetr", "EarlyFusionTrainer", 502),
    Row("PEMMA", "unetr", "PEMMATrainer", 502),
    Row("H2ASeg", "h2aseg", "H2ASegTrainer", 502),
    Row("2.5D slice interaction", "slices25d", "SliceInteractionTrainer", 502),
    Row("2.5D slice interaction, pre-trained", "slices25d", "SliceInteractionFineTuningTrainer", 502),
)
PEER_KINDS = ("unet", "h2aseg", "slices25d")


def peer_preset(kind: str, preset: str) -> str:
    """The preset of a peer at the reproduction preset's size: `h2aseg` for "paper", `h2aseg_demo` for "demo"."""
    return kind if preset == "paper" else f"{kind}_{preset}"


class Comparison(Protocol):
    """The adaptation stage of the reproduction (CT base, PEMMA, early fusion) and the peers' jobs, under OUT."""

    def __init__(self, out: Path, data: Path, preset: str, device: str) -> None:
        self.configs = {"unetr": load_preset(preset).configuration}
        self.configs |= {kind: load_preset(peer_preset(kind, preset)).configuration for kind in PEER_KINDS}
        super().__init__(out, data, preset, device, scope="adaptation")

    def _build(self) -> None:
        super()._build()
        add, previous = "plans add 501", "plans transfer 501->502"
        for kind in PEER_KINDS:
            name = peer_preset(kind, self.preset_name)
            add_peer = self._add(Job(f"plans add 501 {name}", ["pemma", "plans", "add", "501", "--preset", name],
                                     success_marker(self.out / "logs", f"plans add 501 {name}"), [add]))
            # transfers rewrite 502's plans one after the other
            previous = self._add(Job(f"plans transfer 501->502 {name}",
                                     ["pemma", "plans", "transfer", "501", "502", "--preset", name],
                                     success_marker(self.out / "logs", f"plans transfer 501->502 {name}"),
                                     [add_peer, previous]))
            if kind == "slices25d":
                source = self._convert(PRETRAINING_CTPET, "HNC_CTPET_pretraining", PRETRAINING, ["CT", "PET"],
                                       [add_peer])
                source_plans = self._add(Job(f"plans transfer 501->{PRETRAINING_CTPET} {name}",
                                             ["pemma", "plans", "transfer", "501", str(PRETRAINING_CTPET), "--preset",
                                              name],
                                             success_marker(self.out / "logs",
                                                            f"plans transfer 501->{PRETRAINING_CTPET} {name}"),
                                             [source]))
                pretrained = self._train(PRETRAINING_CTPET, "SliceInteractionTrainer", [source_plans],
                                         config=self.configs[kind])
            if kind == "unet":
                cnn_base = self._train(501, CNN_BASE_TRAINER, [add_peer], config=self.configs[kind])
        for job in self.jobs.values():  # every training on 502 starts once its plans are final
            if job.uses_device and " on 502" in job.name:
                job.after.append(previous)
        for row in ROWS:
            if row.kind in PEER_KINDS:
                after = [previous] + ([pretrained] if row.trainer == "SliceInteractionFineTuningTrainer" else []) \
                    + ([cnn_base] if row.from_cnn_base else [])
                weights = (self.checkpoint(PRETRAINING_CTPET, "SliceInteractionTrainer", self.configs[row.kind])
                           if row.trainer == "SliceInteractionFineTuningTrainer" else
                           self.checkpoint(501, CNN_BASE_TRAINER, self.configs[row.kind]) if row.from_cnn_base
                           else None)
                self._train(row.dataset, row.trainer, after, weights, config=self.configs[row.kind])
        self._keep_only([self.checkpoint(r.dataset, r.trainer, self.configs[r.kind]) for r in ROWS])

    def _keep_only(self, targets: Sequence[Path]) -> None:
        """Drop the reproduction's jobs no row needs (late fusion's PET model)."""
        needed = [n for n, j in self.jobs.items() if j.done in targets]
        keep: set[str] = set()
        while needed:
            name = needed.pop()
            if name not in keep:
                keep.add(name)
                needed += self.jobs[name].after
        self.jobs = {n: j for n, j in self.jobs.items() if n in keep}
        self.models = []

    def model_folder_of_row(self, row: Row) -> Path:
        return self.model_folder(row.dataset, row.trainer, self.configs[row.kind])


def _parameters(network) -> tuple[int, int]:
    """(trainable, total): what the row's training updates (PEMMA: its adapters; the others: every weight their
    network leaves trainable, e.g. not MONAI's unused cross-attention norms in early fusion)."""
    from nnunetv2_pemma.adaptation.methods import train_only

    if hasattr(network, "adapter_methods"):
        train_only(network, "adaptation")
    return (sum(p.numel() for p in network.parameters() if p.requires_grad),
            sum(p.numel() for p in network.parameters()))


def score_rows(comparison: Comparison, tta: bool) -> list[dict]:
    """Every row with each of its inputs on the adaptation stage's evaluation cases (labelled test cases)."""
    import os

    from nnunetv2_pemma.evaluation.metrics import evaluate_folders
    from nnunetv2_pemma.experiments.protocol import nnunet_environment
    from nnunetv2_pemma.experiments.scoring import link_inputs, stage_cases
    from nnunetv2_pemma.inference.predictor import build_predictor, run_predictor

    os.environ.update({k: v for k, v in nnunet_environment(comparison.out, comparison.device).items()
                       if k.startswith("nnUNet_")})
    scored = stage_cases(comparison, ADAPTATION)
    cases = list(scored.cases)
    folders = link_inputs(comparison.out / "comparison", scored)
    rows = []
    for row, infer in tqdm([(r, i) for r in ROWS for i in r.infers], desc="peer table inference", unit="model"):
        out = comparison.out / "comparison" / f"{row.trainer}_{infer}"
        predictor = build_predictor(comparison.model_folder_of_row(row), [0], list(INFER[infer]),
                                    device=comparison.device, tta=tta)
        trainable, total = _parameters(predictor.network)
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        run_predictor(predictor, folders[infer], out, cases, len(INFER[infer]))
        seconds = (time.perf_counter() - start) / len(cases)
        result = evaluate_folders(out, folders["gt"], LABELS)
        rows.append({"method": row.name, "trainer": row.trainer, "infer": infer, "cases": len(cases),
                     "scored_on": scored.kind,
                     **{f"{label} {metric}": result.mean[label][metric] for label in LABELS for metric in METRICS},
                     "trainable": trainable, "total": total, "inference_s_per_case": seconds})
    return rows


COLUMNS = ("method", "infer", "cases", *(f"{label} {metric}" for label in LABELS for metric in METRICS), "trainable",
           "total", "inference_s_per_case")


def _format(value: object, column: str) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if column.endswith(("dice", "precision", "recall")):
            return f"{value:.3f}"
        return f"{value:.1f}" if column.endswith("hd95_mm") else f"{value:.2f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown(rows: Sequence[dict], columns: Sequence[str] = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_format(r.get(c, ""), c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_table(rows: Sequence[dict], out: Path, name: str, columns: Sequence[str] = COLUMNS,
                title: str = "Peer table") -> dict[str, Path]:
    """`name`.md, .csv and .png (Dice per class with CP input, one bar pair per method) in `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {"md": out / f"{name}.md", "csv": out / f"{name}.csv", "png": out / f"{name}.png"}
    paths["md"].write_text(f"# {title}\n\n{markdown(rows, columns)}\n")
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    cp = [r for r in rows if r["infer"] == "CP"]
    fig, ax = plt.subplots(figsize=(1.6 * len(cp) + 2, 4))
    for i, label in enumerate(LABELS):
        ax.bar([x + 0.4 * i for x in range(len(cp))], [r[f"{label} dice"] for r in cp], width=0.4, label=label)
    ax.set_xticks([x + 0.2 for x in range(len(cp))], [r["method"] for r in cp], rotation=20, ha="right")
    ax.set_ylabel("mean Dice (CP input)")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    return paths


def run_compare(out: Path, preset: str = "demo", hecktor: Path | None = None, phantom_cases: int = 30,
                phantom_size: str = "small", device: str = "cpu", gpus: Sequence[str] | None = None, seed: int = 0,
                cpu_jobs: int = 2, test_cases: int = 20) -> tuple[list[dict], dict[str, Path]]:
    """Run (or resume) the comparison's jobs, score every row, write comparison.md/.csv/.png under OUT."""
    from nnunetv2_pemma.experiments.reproduce import run_job_graph

    out = out.resolve()
    comparison, _ = run_job_graph(out, lambda data: Comparison(out, data, preset, device), hecktor, phantom_cases,
                                  phantom_size, device, gpus, seed, cpu_jobs, test_cases)
    rows = score_rows(comparison, load_preset(preset).schedule.test_time_mirroring)
    return rows, write_table(rows, out, "comparison", title=f"Peer table ({preset} presets)")
