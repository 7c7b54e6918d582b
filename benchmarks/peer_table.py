"""The peer table: `pemma compare`'s rows (accuracy, parameters, inference time per case) with the training step
time and peak memory of the same networks, measured in one run on one machine (benchmarks/speed_memory.py).

    python benchmarks/peer_table.py --out DIR [--preset demo|paper] [--device cpu|cuda] [--phantom | --hecktor P]

OUT holds the comparison (resumable: a finished `pemma compare` or `pemma demo` run in OUT is reused) and the
benchmark's nnU-Net folders (OUT/bench_workspace). Writes OUT/peer_table.md, .csv and .png and OUT/speed.json.
Budget with the demo presets on 2 CPU cores: the comparison's trainings (CT base, PEMMA, early fusion, nnU-Net's
U-Net, H2ASeg, the 2.5D network from scratch, pre-trained and fine-tuned) and a few minutes of measurements.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import speed_memory
import workspace
from nnunetv2_pemma.experiments.compare import COLUMNS, run_compare, write_table

SETUP_OF_TRAINER = {"nnUNetPresetTrainer": "unet", "nnUNetChannelDropoutTrainer": "unet_channel_dropout",
                    "EarlyFusionCNNTrainer": "early_fusion_cnn", "PEMMACNNTrainer": "pemma_cnn",
                    "EarlyFusionTrainer": "early_fusion",
                    "PEMMATrainer": "pemma_adaptation", "H2ASegTrainer": "h2aseg",
                    "SliceInteractionTrainer": "slices25d", "SliceInteractionFineTuningTrainer": "slices25d"}
"""The benchmark setup that measures each row's training step (a fine-tuned 2.5D model steps as one from scratch)."""
SPEED_COLUMNS = ("step_ms", "peak_memory_mib")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", choices=("demo", "paper"), default="demo")
    parser.add_argument("--hecktor", type=Path, default=None, help="HECKTOR 2022 training folder (default: phantom)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=None, help="measured training steps per network")
    args = parser.parse_args(argv)

    rows, _ = run_compare(args.out, args.preset, hecktor=args.hecktor, device=args.device)
    defaults = speed_memory.DEFAULTS[args.device]
    if defaults["threads"] is not None:
        torch.set_num_threads(defaults["threads"])
    root = args.out.resolve() / "bench_workspace"
    workspace.use(root)
    ws = workspace.prepare(root, args.preset)
    names = sorted(set(SETUP_OF_TRAINER.values()), key=list(speed_memory.SETUPS).index)
    speed = speed_memory.run(ws, names, torch.device(args.device), warmup=defaults["warmup"],
                             steps=args.steps or defaults["steps"], cases=1, measure_memory=True)
    (args.out / "speed.json").write_text(json.dumps(speed, indent=2))
    memory_key = "cuda_peak_bytes" if args.device == "cuda" else "tensor_peak_bytes"
    for row in rows:
        setup = SETUP_OF_TRAINER[row["trainer"]]
        row["step_ms"] = 1000 * speed["train"][setup]["step_s_median"]
        row["peak_memory_mib"] = speed["memory"][setup][memory_key] / 2**20
    machine = speed["machine"]
    where = machine.get("gpu") or f"{machine['cpu']}, {machine['cpu_count']} cores"
    paths = write_table(rows, args.out, "peer_table", (*COLUMNS, *SPEED_COLUMNS),
                        title=f"Peer table ({args.preset} presets, {where})")
    print(paths["md"].read_text())
    print(f"Peer table: {paths['md']}, {paths['csv']}, {paths['png']}; measurements: {args.out / 'speed.json'}")


if __name__ == "__main__":
    main()
