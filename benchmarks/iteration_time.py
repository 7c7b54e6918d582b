"""Where a small-preset training's wall time goes on CPU, and how many iterations per second of wall time a
`nnUNetv2_train` job gets with the previous tiny settings and with the current ones. One run, one machine.

    python benchmarks/iteration_time.py [--out bench_iterations] [--preset tiny]

Measured, on a phantom dataset (4 centres x 8 cases, `small`) planned and preprocessed by nnU-Net:
  1. per iteration, in-process through nnU-Net's own trainer (`get_trainer_from_args`, `get_dataloaders`,
     `train_step`): loading + augmenting a batch with nnU-Net's full pipeline, with the preset's
     data_augmentation choice, and the network step (forward, loss, backward, AdamW), median of 20;
  2. per job, real `nnUNetv2_train` runs, split by the timestamps of nnU-Net's log into start-up (process start,
     imports, dataset and network set-up: until "Epoch 0"), the training loop, and the final validation (after
     "Training done"): the previous tiny settings (30 iterations, 15 per epoch, full augmentation) against the
     preset's;
  3. two one-thread trainings side by side against one two-thread training (`PEMMA_CPU_THREADS`), in training
     iterations per second of wall time.
Writes OUT/iteration_time.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

BIN = Path(sys.executable).parent
PREVIOUS_TINY = {"num_iterations": 30, "num_iterations_per_epoch": 15, "num_val_iterations_per_epoch": 2}


def run(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([str(BIN / args[0]), *args[1:]], env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def prepare(root: Path, presets: dict[str, dict]) -> dict[str, str]:
    from nnunetv2_pemma.experiments.protocol import nnunet_environment

    env = nnunet_environment(root, "cpu")
    data_augmentation_workers = env.pop("nnUNet_n_proc_DA")  # the planner rejects 0 (torch.set_num_threads)
    run(["pemma", "phantom", str(root / "hecktor"), "--cases-per-center", "8"], env)
    run(["pemma", "convert-hecktor", str(root / "hecktor"), "--dataset-id", "701", "--name", "CT", "--centers",
         "CHUM", "CHUP", "CHUS", "CHUV", "--modalities", "CT"], env)
    run(["nnUNetv2_plan_and_preprocess", "-d", "701", "-c", "3d_fullres", "-np", "1", "-npfp", "1"], env)
    for name, preset in presets.items():
        path = root / f"{name}.json"
        path.write_text(json.dumps(preset))
        run(["pemma", "plans", "add", "701", "--preset", str(path)], env)
    env["nnUNet_n_proc_DA"] = data_augmentation_workers
    return env


def in_process(env: dict[str, str], configurations: dict[str, str], threads: int) -> dict[str, float]:
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    os.environ.update({k: v for k, v in env.items() if k.startswith("nnUNet_")})
    torch.set_num_threads(threads)
    result = {}
    for label, configuration in configurations.items():
        trainer = get_trainer_from_args("701", configuration, 0, "UNETRTrainer", device=torch.device("cpu"))
        trainer.initialize()
        loader, _ = trainer.get_dataloaders()
        trainer.network.train()
        loads, steps = [], []
        for _ in range(22):
            start = time.perf_counter()
            batch = next(loader)
            loads.append(time.perf_counter() - start)
            start = time.perf_counter()
            trainer.train_step(batch)
            steps.append(time.perf_counter() - start)
        result[f"load+augment ({label}) ms"] = 1000 * statistics.median(loads[2:])
        result[f"network step ({label}) ms"] = 1000 * statistics.median(steps[2:])
    return result


def _stamp(line: str) -> datetime:
    return datetime.strptime(line[:26], "%Y-%m-%d %H:%M:%S.%f")


def job_phases(env: dict[str, str], configuration: str, threads: int) -> dict[str, float]:
    """Wall time of one real nnUNetv2_train run, split by its log into start-up, training and validation."""
    folder = Path(env["nnUNet_results"]) / "Dataset701_CT" / f"UNETRTrainer__nnUNetPlans__{configuration}"
    subprocess.run(["rm", "-rf", str(folder)], check=True)
    started = datetime.now()
    total = run(["nnUNetv2_train", "701", configuration, "0", "-tr", "UNETRTrainer", "-device", "cpu"],
                {**env, "PEMMA_CPU_THREADS": str(threads)})
    log = next((folder / "fold_0").glob("training_log_*.txt")).read_text().splitlines()
    epoch0 = _stamp(next(line for line in log if line.rstrip().endswith("Epoch 0")))
    done = _stamp(next(line for line in log if line.rstrip().endswith("Training done.")))
    startup = (epoch0 - started).total_seconds()
    training = (done - epoch0).total_seconds()
    return {"wall s": total, "start-up s": startup, "training loop s": training,
            "validation and exit s": total - startup - training}


def parallel_throughput(env: dict[str, str], configuration: str, iterations: int) -> dict[str, float]:
    """Iterations per second of wall time: two one-thread trainings at once vs one two-thread training."""
    def launch(threads: int, results: str) -> subprocess.Popen:
        return subprocess.Popen([str(BIN / "nnUNetv2_train"), "701", configuration, "0", "-tr", "UNETRTrainer",
                                 "-device", "cpu"], env={**env, "PEMMA_CPU_THREADS": str(threads),
                                                         "nnUNet_results": results},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    base = Path(env["nnUNet_results"]).parent
    start = time.perf_counter()
    launch(2, str(base / "results_single")).wait()
    single = time.perf_counter() - start
    start = time.perf_counter()
    procs = [launch(1, str(base / f"results_pair_{k}")) for k in range(2)]
    for p in procs:
        p.wait()
    pair = time.perf_counter() - start
    return {"one 2-thread job: iterations / wall s": iterations / single,
            "two 1-thread jobs: iterations / wall s": 2 * iterations / pair}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_iterations")
    parser.add_argument("--preset", default="tiny")
    args = parser.parse_args()
    from nnunetv2_pemma.plans import load_preset

    out = Path(args.out).resolve()
    # the preset's own JSON (checked by load_preset), changed per variant and written next to the data
    preset = json.loads(Path(load_preset(args.preset).source).read_text())
    preset.pop("name", None)
    full = {k: v for k, v in preset.items() if k != "data_augmentation"}
    previous = full | {"configuration": "3d_unetr_previous", "schedule": preset["schedule"] | PREVIOUS_TINY}
    current = preset | {"configuration": "3d_unetr_current"}
    full |= {"configuration": "3d_unetr_fullda"}
    env = prepare(out, {"previous": previous, "current": current, "fullda": full})
    report: dict[str, dict[str, float]] = {
        "per iteration, 2 threads": in_process(env, {"nnU-Net full": "3d_unetr_fullda",
                                                     "preset": "3d_unetr_current"}, threads=2),
        "previous tiny job": job_phases(env, "3d_unetr_previous", threads=2),
        "current tiny job": job_phases(env, "3d_unetr_current", threads=2),
        "side by side": parallel_throughput(env, "3d_unetr_current", preset["schedule"]["num_iterations"]),
    }
    its = {"previous tiny job": PREVIOUS_TINY["num_iterations"],
           "current tiny job": preset["schedule"]["num_iterations"]}
    for job, n in its.items():
        report[job]["iterations / wall s"] = n / report[job]["wall s"]
    report["ratios"] = {
        "current / previous job, iterations per wall s": report["current tiny job"]["iterations / wall s"]
        / report["previous tiny job"]["iterations / wall s"],
        "two 1-thread / one 2-thread jobs, iterations per wall s":
            report["side by side"]["two 1-thread jobs: iterations / wall s"]
            / report["side by side"]["one 2-thread job: iterations / wall s"],
    }
    (out / "iteration_time.json").write_text(json.dumps(report, indent=2))
    print(f"| measurement | value |\n|---|---|")
    for section, values in report.items():
        for key, value in values.items():
            print(f"| {section}: {key} | {value:.2f} |")


if __name__ == "__main__":
    main()
