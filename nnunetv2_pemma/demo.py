"""`pemma demo`: the README workflow on phantom data with the tiny preset, through nnU-Net's own commands.

CT base (CHUM, CHUP, CHUS, CHUV; CT) -> PEMMA adaptation (MDA; CT+PET) -> LoRA-only continual update (HGJ; CT),
then C, P and CP inference of each model on the adaptation dataset's fold-0 validation cases, scored with
nnU-Net's evaluator. Self-contained: nnU-Net folders live under OUT; a finished step is not redone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from nnunetv2_pemma.errors import PemmaError

REPO = Path(__file__).resolve().parents[1]
CONFIG = "3d_unetr_tiny"
BASE, ADAPT, CONTINUAL = "Dataset501_HNC_CT", "Dataset502_HNC_CTPET_MDA", "Dataset503_HNC_CT_HGJ"
MODELS = (("UNETRTrainer", BASE, ("CT",)), ("PEMMATrainer", ADAPT, ("CT", "PET")),
          ("PEMMAContinualTrainer", CONTINUAL, ("CT", "PET")))
INFERENCE = {"CP": ("CT", "PET"), "C": ("CT",), "P": ("PET",)}


@dataclass(frozen=True)
class Step:
    name: str
    argv: list[str]
    done: Path


def demo_environment(out: Path, device: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (out / name).mkdir(parents=True, exist_ok=True)
        env[name] = str(out / name)
    env["nnUNet_extTrainer"] = str(REPO / "trainers")
    if device == "cpu":  # nnU-Net's defaults spawn 8 export workers and 12 augmentation workers
        env.update(nnUNet_def_n_proc="1", nnUNet_n_proc_DA="0")
    return env


def _checkpoint(out: Path, dataset: str, trainer: str) -> Path:
    return out / "nnUNet_results" / dataset / f"{trainer}__nnUNetPlans__{CONFIG}" / "fold_0" / "checkpoint_final.pth"


def workflow_steps(out: Path, cases_per_center: int, size: str, device: str) -> list[Step]:
    data, raw = out / "hecktor_phantom", out / "nnUNet_raw"
    pre = out / "nnUNet_preprocessed"
    dev = ["-device", device]
    return [
        Step("phantom", ["pemma", "phantom", str(data), "--cases-per-center", str(cases_per_center), "--size", size],
             data / "hecktor2022_endpoint_training.csv"),
        Step("convert CT base centres", ["pemma", "convert-hecktor", str(data), "--dataset-id", "501", "--name",
                                         "HNC_CT", "--centers", "CHUM", "CHUP", "CHUS", "CHUV", "--modalities", "CT"],
             raw / BASE / "dataset.json"),
        Step("plan and preprocess", ["nnUNetv2_plan_and_preprocess", "-d", "501", "-c", "3d_fullres",
                                     "--verify_dataset_integrity", "-np", "1"], pre / BASE / "nnUNetPlans.json"),
        Step("plans add tiny", ["pemma", "plans", "add", "501", "--preset", "tiny"], pre / BASE / "splits_final.json"),
        Step("train CT base", ["nnUNetv2_train", "501", CONFIG, "0", "-tr", "UNETRTrainer", *dev],
             _checkpoint(out, BASE, "UNETRTrainer")),
        Step("convert MDA CT+PET", ["pemma", "convert-hecktor", str(data), "--dataset-id", "502", "--name",
                                    "HNC_CTPET_MDA", "--centers", "MDA", "--modalities", "CT", "PET"],
             raw / ADAPT / "dataset.json"),
        Step("plans transfer 501->502", ["pemma", "plans", "transfer", "501", "502", "--preset", "tiny"],
             pre / ADAPT / "splits_final.json"),
        Step("train PEMMA adaptation", ["nnUNetv2_train", "502", CONFIG, "0", "-tr", "PEMMATrainer", *dev,
                                        "-pretrained_weights", str(_checkpoint(out, BASE, "UNETRTrainer"))],
             _checkpoint(out, ADAPT, "PEMMATrainer")),
        Step("convert HGJ CT", ["pemma", "convert-hecktor", str(data), "--dataset-id", "503", "--name",
                                "HNC_CT_HGJ", "--centers", "HGJ", "--modalities", "CT"], raw / CONTINUAL / "dataset.json"),
        Step("plans transfer 501->503", ["pemma", "plans", "transfer", "501", "503", "--preset", "tiny"],
             pre / CONTINUAL / "splits_final.json"),
        Step("train PEMMA continual (CT only)", ["nnUNetv2_train", "503", CONFIG, "0", "-tr", "PEMMAContinualTrainer",
                                                 *dev, "-pretrained_weights",
                                                 str(_checkpoint(out, ADAPT, "PEMMATrainer"))],
             _checkpoint(out, CONTINUAL, "PEMMAContinualTrainer")),
    ]


def _run(step: Step, env: dict[str, str], logs: Path) -> float:
    exe = Path(sys.executable).parent / step.argv[0]
    argv = [str(exe) if exe.exists() else step.argv[0], *step.argv[1:]]
    log = logs / (step.name.replace(" ", "_").replace(">", "") + ".log")
    if step.argv[0] == "nnUNetv2_plan_and_preprocess":
        # the planner calls torch.set_num_threads(nnUNet_n_proc_DA), which rejects 0
        env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(argv, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise PemmaError(f"demo step '{step.name}' failed (exit {code}); see {log}")
    return time.perf_counter() - start


def _validation_inputs(out: Path, modalities: tuple[str, ...], folder: Path) -> list[str]:
    """Fold-0 validation cases of the adaptation dataset, with only `modalities` as channels."""
    split = json.loads((out / "nnUNet_preprocessed" / ADAPT / "splits_final.json").read_text())[0]["val"]
    images = out / "nnUNet_raw" / ADAPT / "imagesTr"
    folder.mkdir(parents=True, exist_ok=True)
    for case in split:
        for i, m in enumerate(modalities):
            src = images / f"{case}_{('CT', 'PET').index(m):04d}.nii.gz"
            dst = folder / f"{case}_{i:04d}.nii.gz"
            if not dst.exists():
                shutil.copy(src, dst)
    return split


def evaluate_models(out: Path, env: dict[str, str], device: str) -> list[dict]:
    """Dice of every model x inference modality set on the adaptation dataset's validation cases."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder_simple

    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results",
                                            "nnUNet_extTrainer")})
    from nnunetv2_pemma.inference import build_predictor

    gt = out / "nnUNet_preprocessed" / ADAPT / "gt_segmentations"
    rows = []
    for trainer, dataset, trained in MODELS:
        for infer, modalities in INFERENCE.items():
            if not set(modalities) <= set(trained):
                continue
            pred = out / "predictions" / f"{trainer}_{infer}"
            cases = _validation_inputs(out, modalities, out / "predictions" / f"inputs_{infer}")
            if not all((pred / f"{c}.nii.gz").exists() for c in cases):
                predictor = build_predictor(out / "nnUNet_results" / dataset / f"{trainer}__nnUNetPlans__{CONFIG}",
                                            [0], list(modalities), device=device, tta=False)
                predictor.predict_from_files(str(out / "predictions" / f"inputs_{infer}"), str(pred),
                                             save_probabilities=False, overwrite=True,
                                             num_processes_preprocessing=1, num_processes_segmentation_export=1)
            metrics = compute_metrics_on_folder_simple(str(gt), str(pred), [1, 2], num_processes=1, chill=True)
            rows.append({"model": trainer, "trained_on": dataset, "infer": infer, "cases": len(cases),
                         "GTVp": metrics["mean"][1]["Dice"], "GTVn": metrics["mean"][2]["Dice"],
                         "mean": metrics["foreground_mean"]["Dice"]})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| model | trained on | infer | cases | Dice GTVp | Dice GTVn | mean |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['trained_on']} | {r['infer']} | {r['cases']} | {r['GTVp']:.3f} | "
                     f"{r['GTVn']:.3f} | {r['mean']:.3f} |")
    return "\n".join(lines)


def run_demo(out: Path, cases_per_center: int = 6, size: str = "small", device: str = "cpu") -> str:
    out = out.resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = demo_environment(out, device)
    timings = {}
    for step in tqdm(workflow_steps(out, cases_per_center, size, device), desc="pemma demo", unit="step"):
        if step.done.exists():
            continue
        tqdm.write(f"-> {step.name}: {' '.join(step.argv)}")
        timings[step.name] = round(_run(step, env, logs), 1)
    rows = evaluate_models(out, env, device)
    table = format_table(rows)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"rows": rows, "step_seconds": timings}, indent=2))
    return table
