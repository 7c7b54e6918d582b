"""`pemma reproduce --prognosis`: the extended paper's prognosis table (C, CP, CPT; PEMMA with LoRA and DoRA vs
early fusion) through nnU-Net's commands, on the phantom or on HECKTOR 2022's training centres.

Two raw datasets hold the same cases with their outcomes: CT only (the CT base's) and CT+PET (every later stage;
its plans transferred from the CT one). Both get the converter's centre-stratified 5-fold splits, the same for
both; every model trains on fold 0's training cases and is scored on the labelled test cases (fold 0's
validation cases for data without them, as HECKTOR's training centres): Harrell's
C-index of `pemma predict-risk`'s risks with a bootstrap 95% interval and a Kaplan-Meier plot (`pemma
evaluate-survival`). The CT base's row is shared by all methods, which all start from it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from nnunetv2_pemma.data.centers import TRAINING_CENTERS_2022
from nnunetv2_pemma.experiments.evaluation_cases import EvaluationCases, evaluation_cases
from nnunetv2_pemma.experiments.protocol import nnunet_environment
from nnunetv2_pemma.experiments.scheduler import Job, success_marker
from nnunetv2_pemma.plans import load_preset, preset_names

CT_DATASET, CTPET_DATASET = 611, 612
NAMES = {CT_DATASET: "Prognosis_CT", CTPET_DATASET: "Prognosis_CTPET"}
BASE_TRAINER = "SurvivalUNETRTrainer"
METHODS = ("PEMMA (LoRA)", "PEMMA (DoRA)", "Early fusion")
# per method, the trainer of its CP stage and of its CPT stage (the C row is the shared CT base)
TRAINERS: dict[str, tuple[str, str]] = {
    "PEMMA (LoRA)": ("PEMMASurvivalTrainer", "PEMMAClinicalTrainer"),
    "PEMMA (DoRA)": ("PEMMASurvivalDoRATrainer", "PEMMADoRAClinicalTrainer"),
    "Early fusion": ("EarlyFusionSurvivalTrainer", "EarlyFusionClinicalTrainer"),
}
PAPER = {"PEMMA (LoRA)": {"C": 0.61, "CPT": 0.75}, "PEMMA (DoRA)": {"C": 0.66, "CPT": 0.80}}
"""The extended paper's C-indices quoted in its summary (CP not quoted there)."""


@dataclass(frozen=True)
class PrognosisModel:
    """One row cell: a trained model and what it is fed."""

    method: str
    inputs: str  # "C", "CP" or "CPT"
    dataset: int
    trainer: str
    stage: str  # the trainer's training stage, for the trainable-parameter count


def models() -> list[PrognosisModel]:
    out = [PrognosisModel(m, "C", CT_DATASET, BASE_TRAINER, "base") for m in METHODS]
    for method, (cp, cpt) in TRAINERS.items():
        pemma = method.startswith("PEMMA")
        out.append(PrognosisModel(method, "CP", CTPET_DATASET, cp, "adaptation" if pemma else "all"))
        out.append(PrognosisModel(method, "CPT", CTPET_DATASET, cpt, "clinical" if pemma else "all"))
    return out


class PrognosisProtocol:
    """The jobs of one prognosis run in OUT (nnU-Net folders under OUT/nnUNet_*)."""

    def __init__(self, out: Path, data: Path, preset: str, device: str) -> None:
        self.out, self.data, self.preset, self.device = out, data, preset, device
        self.config = load_preset(preset).configuration
        # the CT base learns segmentation and survival from scratch: it may have a longer preset of the same network
        self.base_preset = f"{preset}_base" if f"{preset}_base" in preset_names() else preset
        self.base_config = load_preset(self.base_preset).configuration
        self.jobs: dict[str, Job] = {}
        self._build()

    def dataset_name(self, dataset_id: int) -> str:
        return f"Dataset{dataset_id:03d}_{NAMES[dataset_id]}"

    def config_of(self, trainer: str) -> str:
        return self.base_config if trainer == BASE_TRAINER else self.config

    def model_folder(self, dataset_id: int, trainer: str) -> Path:
        return (self.out / "nnUNet_results" / self.dataset_name(dataset_id)
                / f"{trainer}__nnUNetPlans__{self.config_of(trainer)}")

    def checkpoint(self, dataset_id: int, trainer: str) -> Path:
        return self.model_folder(dataset_id, trainer) / "fold_0" / "checkpoint_final.pth"

    def raw(self, dataset_id: int) -> Path:
        return self.out / "nnUNet_raw" / self.dataset_name(dataset_id)

    def _add(self, job: Job) -> str:
        self.jobs[job.name] = job
        return job.name

    def _train(self, dataset_id: int, trainer: str, after: list[str], pretrained: Path | None = None) -> str:
        argv = ["nnUNetv2_train", str(dataset_id), self.config_of(trainer), "0", "-tr", trainer, "-device",
                self.device]
        if pretrained is not None:
            argv += ["-pretrained_weights", str(pretrained)]
        return self._add(Job(f"train {trainer} on {dataset_id}", argv, self.checkpoint(dataset_id, trainer), after,
                             uses_device=True))

    def _build(self) -> None:
        logs = self.out / "logs"
        converted = {}
        for dataset_id, modalities in ((CT_DATASET, ["CT"]), (CTPET_DATASET, ["CT", "PET"])):
            converted[dataset_id] = self._add(Job(
                f"convert {dataset_id}", ["pemma", "convert-hecktor", str(self.data), "--dataset-id", str(dataset_id),
                                          "--name", NAMES[dataset_id], "--centers", *TRAINING_CENTERS_2022,
                                          "--modalities", *modalities, "--with-outcomes"],
                self.raw(dataset_id) / "dataset.json"))
        plan = self._add(Job(f"plan and preprocess {CT_DATASET}",
                             ["nnUNetv2_plan_and_preprocess", "-d", str(CT_DATASET), "-c", "3d_fullres",
                              "--verify_dataset_integrity", "-np", "1", "-npfp", "1"],
                             self.out / "nnUNet_preprocessed" / self.dataset_name(CT_DATASET)
                             / "nnUNetPlans_3d_fullres",
                             [converted[CT_DATASET]]))
        add_base = self._add(Job(f"plans add {CT_DATASET} base", ["pemma", "plans", "add", str(CT_DATASET),
                                                                  "--preset", self.base_preset],
                                 success_marker(logs, f"plans add {CT_DATASET} base"), [plan]))
        add = self._add(Job(f"plans add {CT_DATASET}", ["pemma", "plans", "add", str(CT_DATASET), "--preset",
                                                        self.preset],
                            success_marker(logs, f"plans add {CT_DATASET}"), [add_base]))
        transfer = self._add(Job(f"plans transfer {CT_DATASET}->{CTPET_DATASET}",
                                 ["pemma", "plans", "transfer", str(CT_DATASET), str(CTPET_DATASET), "--preset",
                                  self.preset],
                                 success_marker(logs, f"plans transfer {CT_DATASET}->{CTPET_DATASET}"),
                                 [add, converted[CTPET_DATASET]]))
        base = self._train(CT_DATASET, BASE_TRAINER, [add])
        for cp, cpt in TRAINERS.values():
            first = self._train(CTPET_DATASET, cp, [transfer, base], self.checkpoint(CT_DATASET, BASE_TRAINER))
            self._train(CTPET_DATASET, cpt, [first], self.checkpoint(CTPET_DATASET, cp))

    def scored_cases(self, dataset_id: int = CTPET_DATASET) -> EvaluationCases:
        """The labelled test cases (fold 0's validation cases without them), the same in both datasets."""
        return evaluation_cases(self.raw(dataset_id))

    def inputs(self, dataset_id: int) -> Path:
        """A folder of links to the scored cases' images of `dataset_id`."""
        scored = self.scored_cases(dataset_id)
        folder = self.out / "prognosis" / f"inputs_{dataset_id}"
        folder.mkdir(parents=True, exist_ok=True)
        for source in sorted(scored.images.iterdir()):
            link = folder / source.name
            if source.name.rsplit("_", 1)[0] in scored.cases and not link.exists():
                link.symlink_to(source)
        return folder


def trainable_parameters(preset: str, model: PrognosisModel) -> int:
    """Parameters that train in the model's stage, counted on the network its trainer builds."""
    from nnunetv2_pemma.adaptation.methods import train_only
    from nnunetv2_pemma.networks.build import (build_survival_early_fusion, build_survival_network,
                                               build_survival_pemma)

    loaded = load_preset(preset)
    block, patch = loaded.block(("CT", "PET")), loaded.patch_size
    if model.stage == "base":
        net = build_survival_network(loaded.block(("CT",)), 1, 3, patch)
    elif model.method.startswith("PEMMA"):
        method = "dora" if "DoRA" in model.method else "lora"
        block = dataclasses.replace(block, adaptation=dataclasses.replace(block.adaptation, method=method))
        net = build_survival_pemma(block, 3, patch, clinical=model.inputs == "CPT")
        train_only(net, model.stage)
    else:
        net = build_survival_early_fusion(block, 3, patch, clinical=model.inputs == "CPT")
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def score(protocol: PrognosisProtocol, n_resamples: int = 1000) -> list[dict]:
    """Each model's risks on the scored cases (labelled test cases), with Harrell's C-index."""
    from nnunetv2_pemma.evaluation.survival import evaluate_survival
    from nnunetv2_pemma.inference.risk import predict_risk

    os.environ.update({k: v for k, v in nnunet_environment(protocol.out, protocol.device).items()
                       if k.startswith("nnUNet_")})
    outcomes = protocol.raw(CTPET_DATASET)
    rows, done = [], {}
    for model in tqdm(models(), desc="prognosis scoring", unit="model"):
        key = (model.dataset, model.trainer)
        if key not in done:
            folder = protocol.out / "prognosis" / f"{model.trainer}_{model.dataset}"
            risks = folder / "risks.csv"
            if not risks.exists():
                predict_risk(protocol.inputs(model.dataset), risks, protocol.dataset_name(model.dataset),
                             protocol.config_of(model.trainer), model.trainer, [0], outcomes=outcomes,
                             device=protocol.device)
            done[key] = evaluate_survival(risks, outcomes, folder, n_resamples=n_resamples)
        report = done[key]
        rows.append({"method": model.method, "inputs": model.inputs, "trainer": model.trainer,
                     "scored_on": protocol.scored_cases().kind, "c_index": report.c_index,
                     "ci_low": report.c_index_ci95[0], "ci_high": report.c_index_ci95[1],
                     "logrank_p": report.logrank_p, "cases": report.n_cases, "events": report.n_events,
                     "trainable": trainable_parameters(protocol.preset, model),
                     "paper": PAPER.get(model.method, {}).get(model.inputs)})
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown: one line per input set, one column per method (C-index [95% CI], trainable parameters)."""
    lines = ["| inputs | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    for inputs in ("C", "CP", "CPT"):
        cells = []
        for method in METHODS:
            r = next(r for r in rows if r["method"] == method and r["inputs"] == inputs)
            paper = f"; paper {r['paper']:.2f}" if r["paper"] is not None else ""
            cells.append(f"{r['c_index']:.3f} [{r['ci_low']:.2f}-{r['ci_high']:.2f}] "
                         f"({r['trainable']:,} trained{paper})")
        lines.append(f"| {inputs} | " + " | ".join(cells) + " |")
    first = rows[0]
    return "\n".join(lines) + (f"\n\nHarrell's C-index on {first['cases']} {first['scored_on']} ({first['events']} "
                               f"relapses), bootstrap 95% intervals; C is the shared CT base.")


def run_prognosis(out: Path, preset: str = "prognosis", hecktor: Path | None = None, phantom_cases: int = 40,
                  phantom_size: str = "small", device: str = "cpu", gpus: Sequence[str] | None = None, seed: int = 0,
                  cpu_jobs: int = 2, test_cases: int = 20) -> str:
    """Run (or resume) the prognosis jobs, score them, write prognosis.md / prognosis.csv; returns the report."""
    import pandas as pd

    from nnunetv2_pemma.experiments.reproduce import run_job_graph

    out = out.resolve()
    protocol, _ = run_job_graph(out, lambda data: PrognosisProtocol(out, data, preset, device), hecktor,
                                phantom_cases, phantom_size, device, gpus, seed, cpu_jobs, test_cases)
    logs = out / "logs"
    rows = score(protocol)
    table = format_table(rows)
    (out / "prognosis.md").write_text(table + "\n")
    pd.DataFrame(rows).to_csv(out / "prognosis.csv", index=False)
    return (f"{table}\n\nTable: {out / 'prognosis.md'}, {out / 'prognosis.csv'}; per model: risks.csv, survival.json "
            f"and kaplan_meier.png in {out / 'prognosis'}; logs: {logs}")
