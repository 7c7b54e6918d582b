"""PEMMA on nnU-Net's ResEnc M plans at a CPU-sized patch, end to end through nnU-Net's commands (tiny budget).

On a small phantom: nnU-Net's ResEnc M planner, its preprocessing, a CT base of its ResidualEncoderUNet
(nnUNetPresetTrainer, unet_tiny's 32^3 patch and 30 iterations), `pemma plans transfer` to MDA's CT+PET, PEMMA on it
(PEMMACNNTrainer), `pemma predict` with CT+PET, CT and PET, and the folded network (fold_adapters) against the
unfolded one on the same cases. Prints one line per step with its wall time; exits non-zero if any fails.

    python benchmarks/resenc_check.py OUT
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunetv2_pemma.adaptation.folding import fold_adapters
from nnunetv2_pemma.experiments.protocol import nnunet_environment
from nnunetv2_pemma.inference.predictor import build_predictor, model_folder_of, run_predictor

BIN = Path(sys.executable).parent
PLANS, CONFIG = "nnUNetResEncUNetMPlans", "3d_fullres_unet_tiny"


def step(what: str, args: list[str], env: dict[str, str], log: Path) -> None:
    started = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(args)}\n")
        out.flush()
        exe = BIN / args[0]
        code = subprocess.run([str(exe) if exe.exists() else args[0], *args[1:]], stdout=out, stderr=out,
                              env=env).returncode
    if code:
        sys.exit(f"{what}: failed (exit {code}); see {log}")
    print(f"{what}: {time.perf_counter() - started:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    out = parser.parse_args().out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = nnunet_environment(out / "nnunet", "cpu")
    planning_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}  # the planner rejects 0
    log = out / "commands.log"
    data = out / "phantom"
    step("phantom", ["pemma", "phantom", str(data), "--cases-per-center", "5", "--labelled-test-cases-per-center",
                     "2", "--seed", "0"], env, log)
    step("convert CT", ["pemma", "convert-hecktor", str(data), "--dataset-id", "501", "--name", "CT", "--centers",
                        "CHUM", "CHUP", "CHUS", "CHUV", "--modalities", "CT"], env, log)
    step("convert CT+PET", ["pemma", "convert-hecktor", str(data), "--dataset-id", "502", "--name", "CTPET",
                            "--centers", "MDA", "--modalities", "CT", "PET"], env, log)
    step("fingerprint", ["nnUNetv2_extract_fingerprint", "-d", "501", "-np", "1"], planning_env, log)
    step("ResEnc M plans", ["nnUNetv2_plan_experiment", "-d", "501", "-pl", "nnUNetPlannerResEncM"], planning_env,
         log)
    step("preprocess", ["nnUNetv2_preprocess", "-d", "501", "-plans_name", PLANS, "-c", "3d_fullres", "-np", "1"],
         planning_env, log)
    step("plans add", ["pemma", "plans", "add", "501", "--preset", "unet_tiny", "--plans", PLANS], env, log)
    step("CT base", ["nnUNetv2_train", "501", CONFIG, "0", "-tr", "nnUNetPresetTrainer", "-p", PLANS, "-device",
                     "cpu"], env, log)
    step("plans transfer", ["pemma", "plans", "transfer", "501", "502", "--preset", "unet_tiny", "--plans", PLANS],
         env, log)
    os.environ.update(env)  # nnU-Net's folders, for the paths below and the in-process prediction
    base = model_folder_of("Dataset501_CT", "nnUNetPresetTrainer", CONFIG, PLANS) / "fold_0"
    step("PEMMA", ["nnUNetv2_train", "502", CONFIG, "0", "-tr", "PEMMACNNTrainer", "-p", PLANS, "-device", "cpu",
                   "-pretrained_weights", str(base / "checkpoint_final.pth")], env, log)
    images = out / "nnunet" / "nnUNet_raw" / "Dataset502_CTPET" / "imagesTs"
    cases = sorted(p.name[:-len("_0000.nii.gz")] for p in images.glob("*_0000.nii.gz"))
    for name, channels in {"CP": [0, 1], "C": [0], "P": [1]}.items():
        inputs = out / "inputs" / name
        inputs.mkdir(parents=True, exist_ok=True)
        for case in cases:
            for i, c in enumerate(channels):
                link = inputs / f"{case}_{i:04d}.nii.gz"
                if not link.exists():
                    link.symlink_to(images / f"{case}_{c:04d}.nii.gz")
        modalities = [["CT", "PET"][c] for c in channels]
        step(f"pemma predict {name}", ["pemma", "predict", "-np", "0", "-i", str(inputs), "-o",
                                       str(out / "predictions" / name), "-d", "502", "-c", CONFIG, "-p", PLANS, "-tr",
                                       "PEMMACNNTrainer", "-f", "0", "-device", "cpu", "--disable_tta",
                                       "--modalities", *modalities], env, log)
    predictor = build_predictor(model_folder_of("Dataset502_CTPET", "PEMMACNNTrainer", CONFIG, PLANS), [0],
                                ["CT", "PET"], tta=False)
    predictor.network = fold_adapters(copy.deepcopy(predictor.network))
    predictor.list_of_parameters = [predictor.network.state_dict()]
    folded = out / "predictions" / "CP_folded"
    folded.mkdir(parents=True, exist_ok=True)
    run_predictor(predictor, out / "inputs" / "CP", folded, cases, 2)
    same = [np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(folded / f"{c}.nii.gz"))),
                           sitk.GetArrayFromImage(sitk.ReadImage(str(out / "predictions" / "CP" / f"{c}.nii.gz"))))
            for c in cases]
    print(f"folded network: same labels as unfolded on {sum(same)} of {len(cases)} cases")
    if not all(same):
        sys.exit("folding changed the labels")


if __name__ == "__main__":
    main()
