"""Forgetting of the earlier centre: the adaptation centre's (MDA) fold-0 validation cases, segmented by each PEMMA
variant's adaptation-stage model and by the same variant after new dataset 1's update (HGJ), in a finished
`pemma reproduce --adapter-methods ...` run.

    python benchmarks/earlier_centre_forgetting.py --run RUN [--methods PEMMA PEMMA-DoRA PEMMA-priors PEMMA-MoA]

Table 2 scores an updated model on the new centre only; this scores it on the centre it was adapted on, with CP, C
and P input: tumour and lymph-node Dice before and after the update, and how many voxels of the masks changed. A
centre-routed mixture of adapters routes MDA cases to MDA's expert, which the update did not touch. Writes
RUN/earlier_centre.md and .csv.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pandas as pd
import SimpleITK as sitk

from nnunetv2_pemma.experiments.protocol import ADAPTER_METHODS, Protocol, nnunet_environment
from nnunetv2_pemma.experiments.scoring import LABELS, _link_inputs, validation_cases
from nnunetv2_pemma.experiments.table2 import ADAPTATION, INFER

TRAINERS = {"PEMMA": ("PEMMATrainer", "PEMMAContinualTrainer"),
            **{name: (adapting, continual) for name, adapting, continual in ADAPTER_METHODS.values()}}


def _changed_voxels(a: Path, b: Path, cases: list[str]) -> int:
    return int(sum((sitk.GetArrayFromImage(sitk.ReadImage(str(a / f"{c}.nii.gz")))
                    != sitk.GetArrayFromImage(sitk.ReadImage(str(b / f"{c}.nii.gz")))).sum() for c in cases))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="output folder of a finished pemma reproduce")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--methods", nargs="+", default=list(TRAINERS), choices=list(TRAINERS))
    args = parser.parse_args()

    from nnunetv2_pemma.evaluation.metrics import evaluate_folders
    from nnunetv2_pemma.inference.predictor import build_predictor, run_predictor

    run = Path(args.run).resolve()
    protocol = Protocol(run, run / "hecktor_phantom", args.preset, "cpu", "demo",
                        [k for k, v in ADAPTER_METHODS.items() if v[0] in args.methods])
    os.environ.update({k: v for k, v in nnunet_environment(run, "cpu").items() if k.startswith("nnUNet_")})
    cases = validation_cases(protocol, ADAPTATION)
    inputs = _link_inputs(protocol, ADAPTATION, cases)
    rows = []
    for method in args.methods:
        folders = {}
        for when, dataset, trainer in (("before", 502, TRAINERS[method][0]), ("after", 511, TRAINERS[method][1])):
            for infer, modalities in INFER.items():
                out = run / "evaluation" / "earlier_centre" / f"{method}_{when}_{infer}"
                if not all((out / f"{c}.nii.gz").exists() for c in cases):
                    out.mkdir(parents=True, exist_ok=True)
                    predictor = build_predictor(protocol.model_folder(dataset, trainer), [0], list(modalities),
                                                tta=False)
                    run_predictor(predictor, inputs[infer], out, cases, len(modalities))
                folders[when, infer] = out
        for infer in INFER:
            row = {"method": method, "infer": infer, "cases": len(cases),
                   "voxels changed": _changed_voxels(folders["before", infer], folders["after", infer], cases)}
            for when in ("before", "after"):
                result = evaluate_folders(folders[when, infer], inputs["gt"], LABELS)
                for label in LABELS:
                    row[f"{label} {when}"] = result.mean[label]["dice"]
            rows.append(row)
    frame = pd.DataFrame(rows)
    frame.to_csv(run / "earlier_centre.csv", index=False)
    lines = ["| method | infer | " + " | ".join(f"{label} Dice before → after" for label in LABELS)
             + " | voxels changed |", "|---|---|" + "---|" * (len(LABELS) + 1)]
    for r in rows:
        dice = " | ".join(f"{r[f'{label} before']:.3f} → {r[f'{label} after']:.3f}" for label in LABELS)
        lines.append(f"| {r['method']} | {r['infer']} | {dice} | {r['voxels changed']:,} |")
    text = (f"Earlier centre (MDA, {len(cases)} fold-0 validation cases) before and after the HGJ CT-only update\n\n"
            + "\n".join(lines) + "\n")
    (run / "earlier_centre.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
