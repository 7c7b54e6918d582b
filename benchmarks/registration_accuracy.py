"""Accuracy and cost of `convert-hecktor --register rigid` on phantoms misaligned by known rigid motions.

    python benchmarks/registration_accuracy.py --out DIR [--size demo] [--cases-per-center 2]
                                               [--offsets 0,0 5,2 10,3 15,5]

For each offset (mm, degrees) it writes a phantom with `misalign`, registers every case's PET to its head-and-neck
CT region as the conversion does, and measures the residual: the distance between where the registration puts each
hot spot (GTVp, lymph nodes, PET mimics) and where the truth puts it, the worst hot spot per case. The aligned
offset (0, 0) measures how far the registration moves already registered cases. Writes OUT/registration.csv (one
row per case), OUT/registration.md (median / worst per offset, seconds per case) and OUT/registration.png.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnunetv2_pemma.data.geometry import crop, crop_record, headneck_box
from nnunetv2_pemma.data.phantom import case_model, read_misalignment, write_phantom
from nnunetv2_pemma.data.registration import RegistrationLimits, register_pet_to_ct, transform_from_record

CROP_MM = (200.0, 200.0, 310.0)


def hot_spot_residual_mm(case_id: str, size: str, seed: int, found: sitk.Transform, truth: sitk.Transform) -> float:
    """Worst distance, over the case's hot spots, between the found and the true PET position of the spot."""
    anatomy = case_model(case_id, case_id.split("-")[0], size, seed).anatomy
    spots = [anatomy.gtvp[0].center] + [n.center for n in anatomy.nodes] + [m[0].center for m in anatomy.mimics]
    return max(float(np.linalg.norm(np.subtract(found.TransformPoint(p), truth.TransformPoint(p)))) for p in spots)


def measure(out: Path, offset: tuple[float, float], size: str, cases_per_center: int, seed: int) -> list[dict]:
    folder = out / f"phantom_{offset[0]:g}mm_{offset[1]:g}deg"
    if not folder.exists():
        write_phantom(folder, cases_per_center, size=size, seed=seed, misalign=offset)
    truth = read_misalignment(folder) if any(offset) else {}
    rows = []
    for ct_file in tqdm(sorted((folder / "imagesTr").glob("*__CT.nii.gz")), desc=f"{offset[0]:g} mm {offset[1]:g} deg"):
        case_id = ct_file.name.split("__")[0]
        ct = sitk.ReadImage(str(ct_file))
        ct = crop(ct, crop_record(ct, headneck_box(ct, CROP_MM), "train"))
        pet = sitk.ReadImage(str(folder / "imagesTr" / f"{case_id}__PT.nii.gz"))
        result = register_pet_to_ct(ct, pet, RegistrationLimits())
        applied = transform_from_record(result.record())
        true_motion = truth[case_id].transform() if case_id in truth else sitk.Euler3DTransform()
        rows.append({"shift_mm": offset[0], "rotation_deg": offset[1], "case": case_id,
                     "pet_voxel_mm": max(pet.GetSpacing()),
                     "residual_mm": hot_spot_residual_mm(case_id, size, seed, applied, true_motion),
                     "residual_unless_kept_mm": hot_spot_residual_mm(case_id, size, seed, result.transform, true_motion),
                     "applied": result.applied, "mi_gain": result.gain, "seconds": result.seconds})
    return rows


def summarise(rows: list[dict]) -> str:
    lines = ["| misalignment | cases | moved | median residual (mm) | worst residual (mm) | worst / PET voxel | "
             "MI optimum, worst (mm) | s per case |", "|---|---|---|---|---|---|---|---|"]
    for offset in dict.fromkeys((r["shift_mm"], r["rotation_deg"]) for r in rows):
        group = [r for r in rows if (r["shift_mm"], r["rotation_deg"]) == offset]
        residuals = np.array([r["residual_mm"] for r in group])
        ratio = max(r["residual_mm"] / r["pet_voxel_mm"] for r in group)
        lines.append(f"| {offset[0]:g} mm, {offset[1]:g} deg | {len(group)} | {sum(r['applied'] for r in group)} | "
                     f"{np.median(residuals):.2f} | {residuals.max():.2f} | {ratio:.2f} | "
                     f"{max(r['residual_unless_kept_mm'] for r in group):.2f} | "
                     f"{np.mean([r['seconds'] for r in group]):.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    offsets = list(dict.fromkeys((r["shift_mm"], r["rotation_deg"]) for r in rows))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, offset in enumerate(offsets):
        values = [r["residual_mm"] for r in rows if (r["shift_mm"], r["rotation_deg"]) == offset]
        ax.scatter(np.full(len(values), i) + np.linspace(-0.15, 0.15, len(values)), values, s=14)
    ax.axhline(8.0, color="grey", linestyle="--", linewidth=1, label="2 PET voxels (2 x 4 mm)")
    ax.set_xticks(range(len(offsets)), [f"{m:g} mm\n{d:g} deg" for m, d in offsets])
    ax.set_ylabel("hot-spot residual after registration (mm)")
    ax.set_title("PET-to-CT rigid registration on the phantom")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", choices=("small", "demo", "hecktor"), default="demo")
    parser.add_argument("--cases-per-center", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--offsets", nargs="+", default=["0,0", "5,2", "10,3", "15,5"], help="MM,DEG pairs")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [row for text in args.offsets
            for row in measure(args.out, tuple(float(v) for v in text.split(",")), args.size, args.cases_per_center,
                               args.seed)]
    with (args.out / "registration.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = summarise(rows)
    (args.out / "registration.md").write_text(table + "\n")
    plot(rows, args.out / "registration.png")
    print(table)


if __name__ == "__main__":
    main()
