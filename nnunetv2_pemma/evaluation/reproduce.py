"""`pemma reproduce`: the PEMMA paper's protocol (Table 1 split, Table 2 matrix) through nnU-Net's commands.

Stages: CT base on the pre-training centres (CHUM, CHUP, CHUS, CHUV); multi-modal adaptation on MDA (CT+PET);
then new dataset 1 (HGJ) and new dataset 2 (HMR), each trained once with CT alone (C) and once with CT+PET (CP),
each starting from the adaptation-stage models. Methods: PEMMA, early fusion, late fusion. Every model is
evaluated with CP, C and P input on its stage's fold-0 validation cases.

Jobs form a small dependency graph; independent ones run in parallel, one per GPU given with --gpus. Every job
has an output that marks it done, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from nnunetv2_pemma.errors import PemmaError
from nnunetv2_pemma.plans import load_preset, preset_names

REPO = Path(__file__).resolve().parents[2]
LABELS = {"GTVp": 1, "GTVn": 2}
INFER = {"CP": ("CT", "PET"), "C": ("CT",), "P": ("PET",)}
METHODS = ("Late fusion", "Early fusion", "PEMMA", "PEMMA (drop)")
DROP = "PEMMA (drop)"  # the PEMMA models, with an absent modality's tokens left out instead of a zero image
PRETRAINING = ("CHUM", "CHUP", "CHUS", "CHUV")
NEW_CENTRES = {"New dataset 1": ("HGJ", 510), "New dataset 2": ("HMR", 520)}
TABLE_COLUMNS = [("Multimodal adaptation", "CP")] + [(s, t) for s in NEW_CENTRES for t in ("C", "CP")]


@dataclass
class Job:
    name: str
    argv: list[str]
    done: Path
    after: list[str] = field(default_factory=list)
    uses_device: bool = False


@dataclass(frozen=True)
class Model:
    """One trained model of the Table 2 matrix: how to predict CP, C and P with it."""

    method: str
    stage: str
    train: str
    dataset: int  # the trained dataset (for PEMMA/early fusion), or the CT model's (late fusion)
    trainer: str
    config: str
    pet_dataset: int | None = None  # late fusion: the PET model's dataset and configuration
    pet_config: str | None = None


class Protocol:
    """The jobs and models of one reproduction run in OUT (nnU-Net folders under OUT/nnUNet_*)."""

    def __init__(self, out: Path, data: Path, preset: str, device: str) -> None:
        self.out, self.data, self.preset_name, self.device = out, data, preset, device
        self.config = load_preset(preset)["configuration"]
        # models trained from scratch (CT base, PET model) may have a longer preset of the same network
        self.base_preset = f"{preset}_base" if f"{preset}_base" in preset_names() else preset
        self.base_config = load_preset(self.base_preset)["configuration"]
        self.jobs: dict[str, Job] = {}
        self.models: list[Model] = []
        self._build()

    # --- paths ------------------------------------------------------------------------------------------------
    def dataset_name(self, dataset_id: int) -> str:
        return self._names[dataset_id]

    def checkpoint(self, dataset_id: int, trainer: str, config: str | None = None) -> Path:
        return (self.out / "nnUNet_results" / self.dataset_name(dataset_id)
                / f"{trainer}__nnUNetPlans__{config or self.config}" / "fold_0" / "checkpoint_final.pth")

    # --- job construction -------------------------------------------------------------------------------------
    def _add(self, job: Job) -> str:
        self.jobs[job.name] = job
        return job.name

    def _convert(self, dataset_id: int, name: str, centres: Sequence[str], modalities: Sequence[str],
                 after: list[str]) -> str:
        self._names[dataset_id] = f"Dataset{dataset_id:03d}_{name}"
        return self._add(Job(f"convert {dataset_id} {name}",
                             ["pemma", "convert-hecktor", str(self.data), "--dataset-id", str(dataset_id), "--name",
                              name, "--centers", *centres, "--modalities", *modalities],
                             self.out / "nnUNet_raw" / self._names[dataset_id] / "dataset.json", after))

    def _transfer(self, target: int, after: list[str]) -> str:
        return self._add(Job(f"plans transfer 501->{target}",
                             ["pemma", "plans", "transfer", "501", str(target), "--preset", self.preset_name],
                             self.out / "nnUNet_preprocessed" / self.dataset_name(target) / "splits_final.json",
                             after))

    def _train(self, dataset_id: int, trainer: str, after: list[str], pretrained: Path | None = None,
               config: str | None = None) -> str:
        config = config or self.config
        argv = ["nnUNetv2_train", str(dataset_id), config, "0", "-tr", trainer, "-device", self.device]
        if pretrained is not None:
            argv += ["-pretrained_weights", str(pretrained)]
        return self._add(Job(f"train {trainer} {config} on {dataset_id}", argv,
                             self.checkpoint(dataset_id, trainer, config), after, uses_device=True))

    def _build(self) -> None:
        self._names: dict[int, str] = {}
        pre = self.out / "nnUNet_preprocessed"
        c501 = self._convert(501, "HNC_CT_pretraining", PRETRAINING, ["CT"], [])
        self._names[501] = "Dataset501_HNC_CT_pretraining"
        plan = self._add(Job("plan and preprocess 501", ["nnUNetv2_plan_and_preprocess", "-d", "501", "-c",
                                                         "3d_fullres", "--verify_dataset_integrity", "-np", "1"],
                             pre / self._names[501] / "nnUNetPlans_3d_fullres", [c501]))
        add_base = self._add(Job("plans add 501 base", ["pemma", "plans", "add", "501", "--preset", self.base_preset],
                                 success_marker(self.out / "logs", "plans add 501 base"), [plan]))
        add = self._add(Job("plans add 501", ["pemma", "plans", "add", "501", "--preset", self.preset_name],
                            success_marker(self.out / "logs", "plans add 501"), [add_base]))
        base_job = self._train(501, "UNETRTrainer", [add], config=self.base_config)
        base = self.checkpoint(501, "UNETRTrainer", self.base_config)

        cp = self._transfer(502, [self._convert(502, "HNC_CTPET_MDA", ["MDA"], ["CT", "PET"], [add])])
        p = self._transfer(503, [self._convert(503, "HNC_PET_MDA", ["MDA"], ["PET"], [add])])
        pemma = self._train(502, "PEMMATrainer", [cp, base_job], base)
        early = self._train(502, "EarlyFusionTrainer", [cp, base_job], base)
        pet_model = self._train(503, "UNETRTrainer", [p], config=self.base_config)
        stage, cfg, base_cfg = "Multimodal adaptation", self.config, self.base_config
        self.models += [Model("Late fusion", stage, "CP", 501, "UNETRTrainer", base_cfg, 503, base_cfg),
                        Model("Early fusion", stage, "CP", 502, "EarlyFusionTrainer", cfg),
                        Model("PEMMA", stage, "CP", 502, "PEMMATrainer", cfg)]

        for stage, (centre, first_id) in NEW_CENTRES.items():
            c_id, cp_id, p_id = first_id + 1, first_id + 2, first_id + 3
            c = self._transfer(c_id, [self._convert(c_id, f"HNC_CT_{centre}", [centre], ["CT"], [add])])
            cpj = self._transfer(cp_id, [self._convert(cp_id, f"HNC_CTPET_{centre}", [centre], ["CT", "PET"], [add])])
            pj = self._transfer(p_id, [self._convert(p_id, f"HNC_PET_{centre}", [centre], ["PET"], [add])])
            for dataset_id, ready, train in ((c_id, c, "C"), (cp_id, cpj, "CP")):
                self._train(dataset_id, "PEMMAContinualTrainer", [ready, pemma], self.checkpoint(502, "PEMMATrainer"))
                self._train(dataset_id, "EarlyFusionTrainer", [ready, early],
                            self.checkpoint(502, "EarlyFusionTrainer"))
                self.models += [Model("PEMMA", stage, train, dataset_id, "PEMMAContinualTrainer", cfg),
                                Model("Early fusion", stage, train, dataset_id, "EarlyFusionTrainer", cfg)]
            # late fusion: the CT model is fine-tuned on the new CT data; with CP data the PET model is too
            self._train(c_id, "UNETRTrainer", [c, base_job], base)
            self._train(p_id, "UNETRTrainer", [pj, pet_model], self.checkpoint(503, "UNETRTrainer", base_cfg))
            self.models += [Model("Late fusion", stage, "C", c_id, "UNETRTrainer", cfg, 503, base_cfg),
                            Model("Late fusion", stage, "CP", c_id, "UNETRTrainer", cfg, p_id, cfg)]

    def evaluation_dataset(self, stage: str) -> int:
        """The CT+PET dataset whose fold-0 validation cases score a stage's models."""
        return 502 if stage == "Multimodal adaptation" else NEW_CENTRES[stage][1] + 2


def nnunet_environment(out: Path, device: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (out / name).mkdir(parents=True, exist_ok=True)
        env[name] = str(out / name)
    env["nnUNet_extTrainer"] = str(REPO / "trainers")
    if device == "cpu":  # nnU-Net's defaults spawn 8 export and 12 augmentation workers
        env.setdefault("nnUNet_def_n_proc", "1")
        env.setdefault("nnUNet_n_proc_DA", "0")
    return env


def _slug(name: str) -> str:
    return name.replace(" ", "_").replace(">", "")


def success_marker(logs: Path, name: str) -> Path:
    """Written when a job succeeds: the done-marker of jobs whose output does not show completion by itself."""
    return logs / f"{_slug(name)}.done"


def _run_job(job: Job, env: dict[str, str], logs: Path, gpu: str | None) -> float:
    exe = Path(sys.executable).parent / job.argv[0]
    argv = [str(exe) if exe.exists() else job.argv[0], *job.argv[1:]]
    env = dict(env)
    if job.argv[0] == "nnUNetv2_plan_and_preprocess":
        env.pop("nnUNet_n_proc_DA", None)  # the planner calls torch.set_num_threads with it, which rejects 0
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    log = logs / f"{_slug(job.name)}.log"
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(argv, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise PemmaError(f"reproduce: job '{job.name}' failed (exit {code}); its log: {log}")
    success_marker(logs, job.name).touch()
    return time.perf_counter() - start


def run_jobs(jobs: dict[str, Job], env: dict[str, str], logs: Path, gpus: Sequence[str] | None) -> dict[str, float]:
    """Run the dependency graph: device jobs one per GPU (one at a time without GPUs), and one CPU-only job
    (conversion, preprocessing) alongside them."""
    pending = {n: j for n, j in jobs.items() if not j.done.exists()}
    finished = set(jobs) - set(pending)
    free: list[str | None] = list(gpus) if gpus else [None]
    timings: dict[str, float] = {}
    running: dict[Future, tuple[str, str | None]] = {}
    bar = tqdm(total=len(jobs), initial=len(finished), desc="pemma reproduce", unit="job")
    with ThreadPoolExecutor(max_workers=len(free) + 1) as pool:
        while pending or running:
            for name in [n for n, j in pending.items() if set(j.after) <= finished]:
                job = pending[name]
                if job.uses_device:
                    if not free:
                        continue
                    gpu = free.pop(0)
                elif any(not jobs[n].uses_device for n, _ in running.values()):
                    continue
                else:
                    gpu = None
                del pending[name]
                tqdm.write(f"-> {name}")
                running[pool.submit(_run_job, job, env, logs, gpu)] = (name, gpu)
            if not running:
                waiting = {n: sorted(set(j.after) - finished) for n, j in pending.items()}
                raise PemmaError(f"reproduce: jobs wait on jobs that cannot run: {waiting}")
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                name, gpu = running.pop(future)
                timings[name] = round(future.result(), 1)
                finished.add(name)
                if jobs[name].uses_device:
                    free.append(gpu)
                bar.update(1)
    bar.close()
    return timings


def _stage_slug(stage: str) -> str:
    return stage.lower().replace(" ", "_")


def validation_cases(protocol: Protocol, stage: str) -> list[str]:
    dataset = protocol.dataset_name(protocol.evaluation_dataset(stage))
    splits = json.loads((protocol.out / "nnUNet_preprocessed" / dataset / "splits_final.json").read_text())
    return sorted(splits[0]["val"])


def _link_inputs(protocol: Protocol, stage: str, cases: list[str]) -> dict[str, Path]:
    """Per inference setting (CP, C, P), a folder of the stage's validation cases with just those channels, and
    a folder of their reference labels."""
    raw = protocol.out / "nnUNet_raw" / protocol.dataset_name(protocol.evaluation_dataset(stage))
    root = protocol.out / "evaluation" / _stage_slug(stage)
    folders = {infer: root / f"inputs_{infer}" for infer in INFER} | {"gt": root / "reference"}
    for infer, modalities in INFER.items():
        folders[infer].mkdir(parents=True, exist_ok=True)
        for case in cases:
            for i, m in enumerate(modalities):
                link = folders[infer] / f"{case}_{i:04d}.nii.gz"
                if not link.exists():
                    link.symlink_to(raw / "imagesTr" / f"{case}_{('CT', 'PET').index(m):04d}.nii.gz")
    folders["gt"].mkdir(parents=True, exist_ok=True)
    for case in cases:
        link = folders["gt"] / f"{case}.nii.gz"
        if not link.exists():
            link.symlink_to(raw / "labelsTr" / f"{case}.nii.gz")
    return folders


def _predict(protocol: Protocol, model: Model, infer: str, inputs: Path, out: Path, tta: bool,
             missing_modality: str | None = None) -> None:
    from nnunetv2_pemma.inference import build_predictor, model_folder_of
    from nnunetv2_pemma.late_fusion import ModelRef, predict_late_fusion

    if model.method == "Late fusion":
        ct = ModelRef(protocol.dataset_name(model.dataset), model.trainer, model.config)
        pet = ModelRef(protocol.dataset_name(model.pet_dataset), "UNETRTrainer", model.pet_config)
        predict_late_fusion(inputs, out, INFER[infer], ct, pet, w_ct=0.5, device=protocol.device, tta=tta)
        return
    folder = model_folder_of(protocol.dataset_name(model.dataset), model.trainer, model.config, "nnUNetPlans")
    predictor = build_predictor(folder, [0], list(INFER[infer]),
                                device=protocol.device, tta=tta, missing_modality=missing_modality)
    # in-process: worker pools would each import torch again, which costs more than a few cases take
    out.mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files_sequential(str(inputs), str(out), save_probabilities=False, overwrite=True)


def score_models(protocol: Protocol, tta: bool) -> list[dict]:
    """Dice of every model with CP, C and P input on its stage's validation cases (the rows of Table 2)."""
    from nnunetv2_pemma.evaluation.metrics import evaluate_folders

    os.environ.update({k: v for k, v in nnunet_environment(protocol.out, protocol.device).items()
                       if k.startswith("nnUNet_")})
    rows = []
    models = tqdm(protocol.models, desc="Table 2 inference", unit="model")
    for model in models:
        cases = validation_cases(protocol, model.stage)
        folders = _link_inputs(protocol, model.stage, cases)
        variants = [(model.method, None)] + ([(DROP, "drop")] if model.method == "PEMMA" else [])
        for (method, missing), infer in ((v, i) for v in variants for i in INFER):
            if missing == "drop" and infer == "CP":  # nothing is absent: the same network as PEMMA's CP
                same = next(r for r in rows if (r["method"], r["stage"], r["train"], r["infer"])
                            == (model.method, model.stage, model.train, "CP"))
                rows.append({**same, "method": method})
                continue
            slug = method.replace(" ", "_").replace("(", "").replace(")", "")
            out = protocol.out / "evaluation" / _stage_slug(model.stage) / f"{slug}_{model.train}_{infer}"
            if not all((out / f"{c}.nii.gz").exists() for c in cases):
                _predict(protocol, model, infer, folders[infer], out, tta, missing)
            result = evaluate_folders(out, folders["gt"], LABELS)
            tumour, lymph = (result.mean[label]["dice"] for label in LABELS)
            rows.append({"method": method, "stage": model.stage, "train": model.train, "infer": infer,
                         "cases": len(cases), "Tumor": tumour, "Lymph": lymph,
                         "Avg": float(np.nanmean([tumour, lymph])) if not np.isnan([tumour, lymph]).all() else np.nan,
                         "DSCagg": result.aggregated_dice_mean})
    return rows


def _cell(rows: list[dict], method: str, stage: str, train: str, infer: str, metric: str) -> float:
    for r in rows:
        if (r["method"], r["stage"], r["train"], r["infer"]) == (method, stage, train, infer):
            return r[metric]
    return float("nan")


def table2_markdown(rows: list[dict]) -> str:
    """Table 2 of the paper: methods x (Tumor, Lymph, Avg) Dice, for each stage, train and infer modalities."""
    header = "| method | Dice | " + " | ".join(f"{s} · train {t} · infer {i}" for s, t in TABLE_COLUMNS
                                                 for i in INFER) + " |"
    lines = [header, "|---|---|" + "---|" * (len(TABLE_COLUMNS) * len(INFER))]
    for method in METHODS:
        for metric in ("Tumor", "Lymph", "Avg"):
            values = [_cell(rows, method, s, t, i, metric) for s, t in TABLE_COLUMNS for i in INFER]
            lines.append(f"| {method} | {metric} | " + " | ".join("–" if np.isnan(v) else f"{v:.2f}" for v in values)
                         + " |")
    return "\n".join(lines)


def write_table2(rows: list[dict], out: Path) -> dict[str, Path]:
    """Table 2 as Markdown, CSV and a heat-map PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    paths = {"md": out / "table2.md", "csv": out / "table2.csv", "png": out / "table2.png"}
    paths["md"].write_text(table2_markdown(rows) + "\n")
    pd.DataFrame(rows).to_csv(paths["csv"], index=False)
    labels = [f"{m} · {k}" for m in METHODS for k in ("Tumor", "Lymph", "Avg")]
    grid = np.array([[_cell(rows, m, s, t, i, k) for s, t in TABLE_COLUMNS for i in INFER]
                     for m in METHODS for k in ("Tumor", "Lymph", "Avg")])
    fig, ax = plt.subplots(figsize=(16, 5.5))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(grid.shape[1]), [f"{s}\ntrain {t} / infer {i}" for s, t in TABLE_COLUMNS for i in INFER],
                  rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for (y, x), v in np.ndenumerate(grid):
        ax.text(x, y, "–" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7,
                color="white" if not np.isnan(v) and v < 0.5 else "black")
    fig.colorbar(image, ax=ax, label="Dice")
    ax.set_title("PEMMA Table 2 reproduction: Dice on each stage's validation cases")
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    return paths


def run_reproduce(out: Path, preset: str, hecktor: Path | None = None, phantom_cases: int = 6,
                  phantom_size: str = "small", device: str = "cpu", gpus: Sequence[str] | None = None) -> str:
    """Run (or resume) the whole protocol; returns Table 2 as Markdown. `hecktor=None` uses a phantom."""
    out = out.resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = nnunet_environment(out, device)
    if hecktor is None:
        hecktor = out / "hecktor_phantom"
        if not (hecktor / "imagesTr").is_dir():
            _run_job(Job("phantom", ["pemma", "phantom", str(hecktor), "--cases-per-center", str(phantom_cases),
                                     "--size", phantom_size], hecktor / "imagesTr"), env, logs, None)
    protocol = Protocol(out, hecktor.resolve(), preset, device)
    timings = run_jobs(protocol.jobs, env, logs, gpus)
    previous = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}
    (out / "timings.json").write_text(json.dumps({**previous, **timings}, indent=2))
    tta = load_preset(preset)["schedule"].get("test_time_mirroring", True)
    rows = score_models(protocol, tta)
    paths = write_table2(rows, out)
    from nnunetv2_pemma.evaluation.parameters import format_parameter_table, measure

    (out / "parameters.md").write_text(format_parameter_table(measure(preset)) + "\n")
    return f"{paths['md'].read_text()}\nTable 2: {paths['md']}, {paths['csv']}, {paths['png']}; parameters: " \
           f"{out / 'parameters.md'}; logs: {logs}"
