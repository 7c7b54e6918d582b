"""Speed-up of `convert-hecktor --register rigid --workers N` over one worker, with identical outputs.

    python benchmarks/registration_workers.py OUT [--cases-per-center 2] [--workers 2] [--size hecktor]

Writes a phantom misaligned by 10 mm and 3 degrees (HECKTOR-sized volumes by default), converts it with rigid
registration once with one worker and once with `--workers`, through the `pemma` command as a user runs it, and
reports both wall times, their ratio and the registration seconds per case. The two datasets must be identical:
every image array and every crop and registration record (but the seconds each registration took).
Writes OUT/registration_workers.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunetv2_pemma.data.geometry import CROPS_FILE
from nnunetv2_pemma.data.phantom import write_phantom

PEMMA = Path(sys.executable).parent / "pemma"


def convert(phantom: Path, raw: Path, dataset_id: int, workers: int) -> float:
    """Wall seconds of one conversion with registration."""
    started = time.perf_counter()
    subprocess.run([str(PEMMA), "convert-hecktor", str(phantom), "--dataset-id", str(dataset_id), "--name",
                    f"Workers{workers}", "--register", "rigid", "--workers", str(workers)],
                   env={**os.environ, "nnUNet_raw": str(raw)}, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def records_without_seconds(dataset: Path) -> dict:
    records = json.loads((dataset / CROPS_FILE).read_text())
    for record in records.values():
        record["registration"].pop("seconds")
    return records


def identical(a: Path, b: Path) -> bool:
    if records_without_seconds(a) != records_without_seconds(b):
        return False
    names = sorted(p.name for p in (a / "imagesTr").iterdir())
    return names == sorted(p.name for p in (b / "imagesTr").iterdir()) and all(
        np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(a / "imagesTr" / n))),
                       sitk.GetArrayFromImage(sitk.ReadImage(str(b / "imagesTr" / n)))) for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--cases-per-center", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", default="hecktor")
    args = parser.parse_args()
    out = args.out.resolve()
    phantom, raw = out / "phantom", out / "raw"
    if not phantom.exists():
        write_phantom(phantom, args.cases_per_center, size=args.size, seed=0, misalign=(10.0, 3.0))
    raw.mkdir(parents=True, exist_ok=True)
    seconds = {}
    for number, workers in ((700, 1), (701, args.workers)):
        existing = list(raw.glob(f"Dataset{number}_*"))
        for folder in existing:
            subprocess.run(["rm", "-rf", str(folder)], check=True)
        seconds[workers] = convert(phantom, raw, number, workers)
    one, many = (next(raw.glob(f"Dataset{n}_*")) for n in (700, 701))
    per_case = [r["registration"]["seconds"] for r in json.loads((one / CROPS_FILE).read_text()).values()]
    same = identical(one, many)
    text = (f"{len(per_case)} {args.size}-sized phantom cases (misaligned 10 mm, 3 degrees), `convert-hecktor "
            f"--register rigid`, {os.cpu_count()} CPU cores:\n\n"
            f"| workers | wall time (s) | speed-up |\n|---|---|---|\n"
            f"| 1 | {seconds[1]:.1f} | 1.00 |\n"
            f"| {args.workers} | {seconds[args.workers]:.1f} | {seconds[1] / seconds[args.workers]:.2f} |\n\n"
            f"Registration per case with one worker: median {np.median(per_case):.1f} s (range {min(per_case):.1f}"
            f"-{max(per_case):.1f} s). Outputs identical (images and records): {same}.\n")
    (out / "registration_workers.md").write_text(text)
    print(text)
    if not same:
        sys.exit("the datasets differ between 1 and several workers")


if __name__ == "__main__":
    main()
