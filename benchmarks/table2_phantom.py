"""Table 2 on the phantom with error bars: the whole protocol (`pemma reproduce --scope full`) for several phantom
seeds, then mean ± std per cell and the claims checked on the means.

    python benchmarks/table2_phantom.py --out bench_table2 [--seeds 0 1 2] [--preset demo] [--device cpu]

Each seed is one resumable `pemma reproduce` run in OUT/seed_<k> (a new phantom drawn with that seed, every model
trained anew), so a stopped benchmark resumes where it was. Writes each seed's Table 2 into its folder, and
OUT/table2.md, .csv and .png (mean ± std; tumour Dice with error bars), OUT/claims.txt and OUT/timings.json (wall
time per seed). Budget: about 22 minutes a seed on 2 CPU cores with the demo presets (16 trainings, then 5
minutes of Table 2 inference); `--preset paper --device cuda --gpus ...` on GPUs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from nnunetv2_pemma.experiments.claims import BENCHMARK, check_claims
from nnunetv2_pemma.experiments.reproduce import run_protocol
from nnunetv2_pemma.experiments.table2 import aggregate, write_table2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--gpus", nargs="+", default=None)
    parser.add_argument("--cases-per-center", type=int, default=30)
    parser.add_argument("--scope", choices=("full", "demo"), default="full")
    args = parser.parse_args()

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    runs, bases, wall = [], [], {}
    for seed in args.seeds:
        start = time.perf_counter()
        result = run_protocol(out / f"seed_{seed}", args.preset, phantom_cases=args.cases_per_center,
                              device=args.device, gpus=args.gpus, scope=args.scope, seed=seed)
        wall[f"seed_{seed}"] = round(time.perf_counter() - start, 1)
        write_table2(result.rows, result.out, title=f"Table 2 on the phantom, seed {seed}")
        runs.append(result.rows)
        bases.append(result.base_dice or {})
        fraction = result.trainable_fraction
        print(f"seed {seed}: {wall[f'seed_{seed}']:.0f} s", flush=True)
    rows = aggregate(runs)
    base_mean = {k: sum(b.get(k, float("nan")) for b in bases) / len(bases) for k in ("GTVp", "GTVn")}
    paths = write_table2(rows, out, title=f"Table 2 on the phantom: mean ± std over seeds {args.seeds}")
    claims = check_claims(rows, BENCHMARK, base_mean, fraction)
    (out / "claims.txt").write_text("\n".join(map(str, claims)) + "\n")
    (out / "timings.json").write_text(json.dumps({"wall_s_per_seed": wall, "base_validation_dice": bases},
                                                 indent=2))
    print(paths["md"].read_text())
    print("\n".join(map(str, claims)))


if __name__ == "__main__":
    main()
