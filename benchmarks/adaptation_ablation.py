"""PEMMA adaptation variants on the same CT base and data as a finished `pemma demo` / `pemma reproduce` run:
CP, C and P tumour Dice at the adaptation stage for each variant trainer, next to the run's own PEMMA and early
fusion.

    python benchmarks/adaptation_ablation.py --run pemma_demo [--trainers PEMMATrainer_noModalityDropout ...]

Each variant is a trainer of `trainers/` that overrides one preset value (modality dropout, PET initialisation,
adapter method); it is trained through `nnUNetv2_train` from the run's CT base on the run's MDA CT+PET dataset
and scored on the same fold-0 validation cases as the run's Table 2. Writes RUN/ablation.md and .csv.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from nnunetv2_pemma.experiments.protocol import Model, Protocol, nnunet_environment
from nnunetv2_pemma.experiments.scheduler import Job, cpu_slots, run_jobs
from nnunetv2_pemma.experiments.scoring import score_models
from nnunetv2_pemma.experiments.table2 import ADAPTATION, INFER
from nnunetv2_pemma.plans import load_preset

DEFAULT = ("PEMMATrainer_noModalityDropout", "PEMMATrainer_zeroinit", "PEMMATrainer_randominit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="output folder of a finished pemma demo / reproduce")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--scope", default="demo")
    parser.add_argument("--trainers", nargs="+", default=list(DEFAULT))
    args = parser.parse_args()

    run = Path(args.run).resolve()
    protocol = Protocol(run, run / "hecktor_phantom", args.preset, "cpu", args.scope)
    base = protocol.checkpoint(501, "UNETRTrainer", protocol.base_config)
    jobs = {f"ablation {t}": Job(f"ablation {t}", ["nnUNetv2_train", "502", protocol.config, "0", "-tr", t,
                                                    "-device", "cpu", "-pretrained_weights", str(base)],
                                 protocol.checkpoint(502, t), uses_device=True) for t in args.trainers}
    run_jobs(jobs, nnunet_environment(run, "cpu"), run / "logs", cpu_slots(2))
    protocol.models = [Model(t, ADAPTATION, "CP", 502, t, protocol.config) for t in
                       ("PEMMATrainer", "EarlyFusionTrainer", *args.trainers)]
    rows = score_models(protocol, load_preset(args.preset).schedule.test_time_mirroring)
    pd.DataFrame(rows).to_csv(run / "ablation.csv", index=False)
    columns = [(metric, infer) for metric in ("Tumor", "Lymph") for infer in INFER]
    lines = ["| trainer | " + " | ".join(f"{m} · infer {i}" for m, i in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for method in dict.fromkeys(r["method"] for r in rows):
        values = {(m, r["infer"]): r[m] for r in rows if r["method"] == method for m in ("Tumor", "Lymph")}
        lines.append(f"| {method} | " + " | ".join(f"{values[c]:.2f}" for c in columns) + " |")
    (run / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
