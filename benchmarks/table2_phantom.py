"""Table 2 on the phantom over seeds: the whole protocol (`pemma reproduce --scope full`) for several seeds (each
seeds the phantom and every training), then per cell the mean ± std over seeds, and each seed's claims beside the
claims decided on the seeds' labelled test cases pooled.

    python benchmarks/table2_phantom.py --out bench_table2 [--seeds 0 1 2] [--preset demo] [--device cpu]

Each seed is one resumable `pemma reproduce` run in OUT/seed_<k> (a new phantom drawn with that seed, every model
trained anew), so a stopped benchmark resumes where it was. Writes each seed's Table 2 into its folder, and
OUT/table2.md, .csv and .png (mean ± std over seeds, interval over the pooled cases), OUT/seed_spread.json (each
claim's compared difference: its standard deviation over the seeds), OUT/claims.txt (the pooled claims, then each
seed's verdicts with that spread and on its cases alone) and OUT/timings.json (this invocation's wall time per
seed: a resumed seed counts only what was left). `--record-spread` also records the spread in the package
(`experiments/seed_spread.json`), where `pemma reproduce` and `pemma demo` take it from. Budget on 2 CPU cores:
`--scope demo` takes a demo's time a seed (about 13 minutes; 17 with `--adapter-methods input_skip`); the full
protocol was not timed since the labelled test cases came in; `--preset paper --device cuda --gpus ...` on GPUs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from nnunetv2_pemma.experiments.claims import BENCHMARK, DEMO, check_claims
from nnunetv2_pemma.experiments.seed_spread import measure_spread, record_spread
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
    parser.add_argument("--labelled-test-cases-per-center", type=int, default=20)
    parser.add_argument("--adapter-methods", nargs="*", default=[], help="extra PEMMA rows, as pemma reproduce's")
    parser.add_argument("--scope", choices=("full", "demo"), default="full",
                        help="demo: `pemma demo` once per seed, its claims with the demo's tolerances")
    parser.add_argument("--record-spread", action="store_true",
                        help="record the seeds' spread in the package, for pemma reproduce / demo to decide with")
    args = parser.parse_args()
    tolerances = DEMO if args.scope == "demo" else BENCHMARK

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    runs, bases, wall, case_only = [], [], {}, {}
    for seed in args.seeds:
        start = time.perf_counter()
        result = run_protocol(out / f"seed_{seed}", args.preset, phantom_cases=args.cases_per_center,
                              device=args.device, gpus=args.gpus, scope=args.scope, seed=seed,
                              test_cases=args.labelled_test_cases_per_center, adapter_methods=args.adapter_methods)
        wall[f"seed_{seed}"] = round(time.perf_counter() - start, 1)
        write_table2(result.rows, result.out, title=f"Table 2 on the phantom, seed {seed}")
        runs.append(result.rows)
        bases.append(result.base_row)
        fraction = result.trainable_fraction
        case_only[seed] = check_claims(result.rows, tolerances, result.base_row, fraction)
        print(f"seed {seed}: {wall[f'seed_{seed}']:.0f} s", flush=True)
    spread = measure_spread(list(case_only.values()))
    (out / "seed_spread.json").write_text(json.dumps(spread, indent=2) + "\n")
    if args.record_spread:
        record_spread(result.setting, spread, args.seeds, "python benchmarks/table2_phantom.py " + " ".join(
            a for a in sys.argv[1:] if a != "--record-spread"))
    with_spread = {seed: check_claims(run, tolerances, base, fraction, spread)
                   for seed, run, base in zip(args.seeds, runs, bases)}
    rows = aggregate(runs)
    paths = write_table2(rows, out, title=f"Table 2 on the phantom: mean ± std over seeds {args.seeds}")
    # the pooled claims: the mean over k seeds moves by the spread / sqrt(k)
    pooled_spread = {key: sd / math.sqrt(len(runs)) for key, sd in spread.items()}
    claims = check_claims(rows, tolerances, aggregate([[b] for b in bases])[0], fraction, pooled_spread)
    lines = [*map(str, claims)]
    for title, verdicts in (("with the seed spread", with_spread), ("on each seed's cases alone", case_only)):
        lines += ["", f"Each seed's verdicts, {title}:", "",
                  "| claim | " + " | ".join(f"seed {s}" for s in verdicts) + " |", "|---|" + "---|" * len(verdicts)]
        lines += [f"| {c.text} | " + " | ".join(v[i].verdict for v in verdicts.values()) + " |"
                  for i, c in enumerate(claims)]
    text = "\n".join(lines) + "\n"
    (out / "claims.txt").write_text(text)
    (out / "timings.json").write_text(json.dumps({"wall_s_per_seed": wall}, indent=2))
    print(paths["md"].read_text())
    print(text)


if __name__ == "__main__":
    main()
