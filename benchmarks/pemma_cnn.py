"""PEMMA on nnU-Net's own U-Net against the models a user would otherwise train, on the phantom, through nnU-Net's
commands (README "PEMMA on nnU-Net's U-Net").

Data: the demo's phantom (30 training and 20 labelled test cases per centre, seed 0). The CT base is nnU-Net's
3d_fullres U-Net trained on the pre-training centres' CT (dataset 501). On MDA's CT+PET (502, fold 0: 24 training
cases) it compares:

- PEMMA on the CNN (PEMMACNNTrainer: PET slot, conv LoRA with CT-only pairs; `--train-norms` adds the variant
  with norm shifts and shared adapters),
- nnU-Net's U-Net from scratch on CT+PET with channel dropout (nnUNetChannelDropoutTrainer),
- early fusion on the CNN, fine-tuned from the base (EarlyFusionCNNTrainer),

each scored with CT+PET, CT and PET input on MDA's labelled test cases (GTVp and GTVn Dice, 95 % bootstrap
intervals), the base with CT. The learning curve trains the three on 4, 8 and 16 of the 24 cases (extra folds
5-7 of splits_final.json, nnU-Net's own mechanism for custom splits). A CT-only update on HGJ (503,
PEMMACNNContinualTrainer) is scored on MDA before and after and on HGJ's own CT, and its base tensors, PET slot
and PET adapter pair compared bit for bit.

Budgets (iterations of batch 2, 32^3 patches) are arguments: the CT base gets `--base-iterations`, every other
training `--iterations`. Results go to OUT/pemma_cnn.json (resumable: finished trainings and scores are kept),
OUT/pemma_cnn.md and OUT/learning_curve.png. Trainings run two at a time with one thread each (`--jobs`).

    python benchmarks/pemma_cnn.py OUT [--base-iterations 1000] [--iterations 500] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from nnunetv2_pemma.environment import preset_folder
from nnunetv2_pemma.evaluation.intervals import paired_difference
from nnunetv2_pemma.experiments.evaluation_cases import evaluation_cases
from nnunetv2_pemma.experiments.protocol import nnunet_environment
from nnunetv2_pemma.experiments.scoring import link_inputs, scored_row
from nnunetv2_pemma.inference.predictor import build_predictor, model_folder_of, run_predictor

BIN = Path(sys.executable).parent
INPUTS = {"CP": ("CT", "PET"), "C": ("CT",), "P": ("PET",)}
CURVE = {5: 4, 6: 8, 7: 16}  # extra fold -> training cases (fold 0: all 24)
METHODS = {"PEMMA (CNN)": "PEMMACNNTrainer", "U-Net, channel dropout": "nnUNetChannelDropoutTrainer",
           "Early fusion (CNN)": "EarlyFusionCNNTrainer"}
LONG_SCRATCH = "U-Net, channel dropout, CT base's budget"
FROM_BASE = {"PEMMACNNTrainer", "PEMMACNNTrainer_trainNorms", "EarlyFusionCNNTrainer"}


def run(args: list[str], log: Path, env: dict[str, str]) -> float:
    """Run a console command of this venv; returns its wall time. Exits with the log's tail on failure."""
    exe = BIN / args[0]
    started = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(args)}\n")
        out.flush()
        proc = subprocess.run([str(exe) if exe.exists() else args[0], *args[1:]], stdout=out, stderr=out, env=env)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed; see {log}")
    return time.perf_counter() - started


def preset(out: Path, name: str, iterations: int) -> Path:
    """unet_demo with another configuration name and iteration budget."""
    raw = json.loads((preset_folder() / "unet_demo.json").read_text())
    raw["configuration"] = f"3d_fullres_{name}"
    raw["schedule"]["num_iterations"] = iterations
    path = out / f"{name}.json"
    path.write_text(json.dumps(raw, indent=2))
    return path


class Bench:
    def __init__(self, out: Path, base_iterations: int, iterations: int) -> None:
        self.out = out
        self.env = {**nnunet_environment(out / "nnunet", "cpu"), "PEMMA_SEED": "0", "PEMMA_CPU_THREADS": "1"}
        os.environ.update(self.env)  # the in-process predictions read nnU-Net's folders
        self.log = out / "commands.log"
        self.record_file = out / "pemma_cnn.json"
        self.record = json.loads(self.record_file.read_text()) if self.record_file.is_file() else {
            "base_iterations": base_iterations, "iterations": iterations, "train_seconds": {}, "scores": {}}
        self.base_preset = preset(out, "cnn_base", base_iterations)
        self.adapt_preset = preset(out, "cnn_adapt", iterations)
        self.base_config, self.config = "3d_fullres_cnn_base", "3d_fullres_cnn_adapt"
        self.seconds: dict[str, float] = {}

    def save(self) -> None:
        self.record_file.write_text(json.dumps(self.record, indent=1))

    def cmd(self, *args: str) -> float:
        return run(list(args), self.log, {k: v for k, v in self.env.items() if k != "nnUNet_n_proc_DA"}
                   if args[0] == "nnUNetv2_plan_and_preprocess" else self.env)

    def dataset(self, number: int) -> str:
        return next(p.name for p in (self.out / "nnunet" / "nnUNet_raw").glob(f"Dataset{number}_*"))

    def checkpoint(self, number: int, trainer: str, config: str, fold: int) -> Path:
        return model_folder_of(self.dataset(number), trainer, config, "nnUNetPlans") / f"fold_{fold}" / \
            "checkpoint_final.pth"

    def prepare(self) -> None:
        data = self.out / "phantom"
        if (self.out / "prepared").is_file():
            return
        self.cmd("pemma", "phantom", str(data), "--cases-per-center", "30", "--labelled-test-cases-per-center", "20",
                 "--seed", "0")
        for number, name, centres, modalities in (
                (501, "HNC_CT", ["CHUM", "CHUP", "CHUS", "CHUV"], ["CT"]),
                (502, "HNC_CTPET_MDA", ["MDA"], ["CT", "PET"]), (503, "HNC_CT_HGJ", ["HGJ"], ["CT"])):
            self.cmd("pemma", "convert-hecktor", str(data), "--dataset-id", str(number), "--name", name,
                     "--centers", *centres, "--modalities", *modalities)
        self.cmd("nnUNetv2_plan_and_preprocess", "-d", "501", "-c", "3d_fullres", "-np", "2", "-npfp", "2")
        for p in (self.base_preset, self.adapt_preset):
            self.cmd("pemma", "plans", "add", "501", "--preset", str(p))
            for target in ("502", "503"):
                self.cmd("pemma", "plans", "transfer", "501", target, "--preset", str(p))
        splits_file = self.out / "nnunet" / "nnUNet_preprocessed" / self.dataset(502) / "splits_final.json"
        splits = json.loads(splits_file.read_text())[:5]
        for fold, n in CURVE.items():  # nested subsets of fold 0's training cases, same validation cases
            splits.append({"train": sorted(splits[0]["train"])[:n], "val": splits[0]["val"]})
        splits_file.write_text(json.dumps(splits, indent=1))
        (self.out / "prepared").write_text("")

    def train(self, number: int, trainer: str, config: str, fold: int, weights: Path | None = None) -> Path:
        """Train unless done; a training another process holds (its lock file) is waited for."""
        done = self.checkpoint(number, trainer, config, fold)
        lock = self.out / "locks" / f"{number}_{trainer}_{config}_{fold}"
        lock.parent.mkdir(exist_ok=True)
        if weights is not None:
            while not weights.is_file():  # its start is another job's training
                time.sleep(10)
        if done.is_file():
            return done
        try:
            lock.touch(exist_ok=False)
        except FileExistsError:
            while not done.is_file():
                time.sleep(10)
            return done
        args = ["nnUNetv2_train", str(number), config, str(fold), "-tr", trainer, "-device", "cpu"]
        seconds = self.cmd(*args, *(["-pretrained_weights", str(weights)] if weights else []))
        self.seconds[f"{trainer} {number} fold {fold}"] = round(seconds, 1)
        lock.unlink()
        return done

    def train_all(self, jobs: list[tuple[int, str, int, Path | None, str]], workers: int,
                  done: Callable[[int, str, int, str], None] | None = None) -> None:
        """The trainings (dataset, trainer, fold, start, configuration), `workers` at a time in submission order;
        one thread each (PEMMA_CPU_THREADS=1). `done(dataset, trainer, fold, configuration)` runs in this thread as
        each finishes."""
        from concurrent.futures import ThreadPoolExecutor, as_completed

        with ThreadPoolExecutor(workers) as pool:
            futures = {pool.submit(self.train, n, t, c, f, w): (n, t, f, c) for n, t, f, w, c in jobs}
            for future in as_completed(futures):
                future.result()
                self.record["train_seconds"].update(self.seconds)
                self.save()
                if done is not None:
                    done(*futures[future])

    def score(self, key: str, number: int, trainer: str, config: str, fold: int, infer: str,
              centre: int = 502) -> dict:
        """GTVp/GTVn Dice of a model on the labelled test cases of dataset `centre` (MDA; 503: HGJ) with input
        `infer`."""
        name = f"{key} | {infer}"
        if name not in self.record["scores"]:
            scored = evaluation_cases(self.out / "nnunet" / "nnUNet_raw" / self.dataset(centre))
            inputs = link_inputs(self.out / "inputs" / str(centre), scored, [infer])[infer]
            predictor = build_predictor(model_folder_of(self.dataset(number), trainer, config, "nnUNetPlans"),
                                        [fold], list(INPUTS[infer]), device="cpu", tta=False)
            prediction = self.out / "predictions" / key.replace(" ", "_").replace(",", "") / infer
            prediction.mkdir(parents=True, exist_ok=True)
            run_predictor(predictor, inputs, prediction, list(scored.cases), len(INPUTS[infer]))
            self.record["scores"][name] = scored_row(prediction, scored.labels)
            self.save()
        return self.record["scores"][name]


def trainable_parameters(bench: Bench, number: int, trainer: str, config: str) -> tuple[int, int]:
    """(trainable, total) parameters of a trained model's network: PEMMA's adapters and PET slot, or everything."""
    from nnunetv2_pemma.adaptation.methods import train_only

    network = build_predictor(model_folder_of(bench.dataset(number), trainer, config, "nnUNetPlans"), [0],
                              None, device="cpu", tta=False).network
    if hasattr(network, "adapter_methods"):
        train_only(network, "adaptation")
    params = list(network.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def report(bench: Bench, curve: bool) -> str:
    """pemma_cnn.md: the 24-case table with paired differences, the update, the learning curve (and its PNG)."""
    scores = bench.record["scores"]
    rec = bench.record
    lines = [f"CT base {rec['base_iterations']} iterations, every other training {rec['iterations']} unless named "
             f"(batch 2, 32^3 patches, 2 CPU cores); Dice on MDA's {scores['CT base | C']['cases']} labelled test "
             f"cases, mean [95 % bootstrap interval].", "",
             "| model | trainable / total parameters | input | GTVp | GTVn |", "|---|---|---|---|---|"]
    cell = lambda row, m: f"{row[m]:.3f} [{row[m + '_low']:.2f}, {row[m + '_high']:.2f}]"  # noqa: E731
    trainers = {"CT base": (501, "nnUNetPresetTrainer"), **{k: (502, v) for k, v in METHODS.items()},
                LONG_SCRATCH: (502, "nnUNetChannelDropoutTrainer"),
                "PEMMA (CNN), norms trained": (502, "PEMMACNNTrainer_trainNorms")}
    for label, (number, trainer) in trainers.items():
        if f"{label} | {'C' if number == 501 else 'CP'}" not in scores:
            continue  # not run (the norm-shift variant is optional: --train-norms)
        if number == 501:
            sizes = ""
        else:
            trainable, total = trainable_parameters(bench, number, trainer, bench.base_config if label == LONG_SCRATCH
                                                    else bench.config)
            sizes = f"{trainable:,} / {total:,} ({100 * trainable / total:.1f} %)"
            bench.record.setdefault("parameters", {})[label] = [trainable, total]
        for infer in ("CP", "C", "P") if number == 502 else ("C",):
            row = scores[f"{label} | {infer}"]
            lines.append(f"| {label} | {sizes} | {infer} | {cell(row, 'Tumor')} | {cell(row, 'Lymph')} |")
    lines += ["", "Paired differences of GTVp Dice over the same cases (mean [95 % interval]):", ""]

    def diff(a: str, b: str) -> str:
        est = paired_difference({c: v["Tumor"] for c, v in scores[a]["per_case"].items()},
                                {c: v["Tumor"] for c, v in scores[b]["per_case"].items()})
        return f"{est.mean:+.3f} [{est.low:+.3f}, {est.high:+.3f}]"

    pemma = "PEMMA (CNN)"
    checks = [(f"{pemma} | CP", "U-Net, channel dropout | CP", "CT+PET: PEMMA - U-Net from scratch (aim >= -0.03)"),
              (f"{pemma} | CP", f"{LONG_SCRATCH} | CP",
               "CT+PET: PEMMA - U-Net from scratch with the CT base's budget (aim >= -0.03)"),
              (f"{pemma} | P", f"{LONG_SCRATCH} | P", "PET: PEMMA - that U-Net (aim >= -0.05)"),
              (f"{pemma} | C", "CT base | C", "CT: PEMMA - its CT base (aim >= 0)"),
              (f"{pemma} | P", "U-Net, channel dropout | P", "PET: PEMMA - channel-dropout U-Net (aim >= -0.05)"),
              (f"{pemma}, norms trained | CP", f"{pemma} | CP", "norms trained - frozen, CT+PET"),
              ("Early fusion (CNN) | CP", f"{pemma} | CP", "early fusion - PEMMA, CT+PET")]
    lines += [f"- {text}: {diff(a, b)}" for a, b, text in checks if a in scores and b in scores]
    after = f"{pemma} after CT-only HGJ update"
    lines += ["", f"CT-only update on HGJ (PEMMACNNContinualTrainer): base bit-identical: "
              f"{rec['update_base_bit_identical']}, PET slot and PET adapter pair bit-identical: "
              f"{rec['update_pet_slot_bit_identical']}; MDA's Dice after - before:", ""]
    lines += [f"- {infer}: {diff(f'{after} | {infer}', f'{pemma} | {infer}')}" for infer in ("CP", "C", "P")]
    hgj = f"{diff(f'{after} on HGJ | C', f'{pemma} on HGJ | C')}; the CT base on HGJ: " \
          f"{cell(scores['CT base on HGJ | C'], 'Tumor')}"
    lines += [f"- HGJ's own CT (its {scores[f'{after} on HGJ | C']['cases']} labelled test cases), GTVp after - "
              f"before: {hgj}"]
    if curve:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        lines += ["", "Learning curve, CT+PET GTVp Dice by number of MDA training cases:", "",
                  "| model | " + " | ".join(str(n) for n in (*CURVE.values(), 24)) + " |",
                  "|---|" + "---|" * (len(CURVE) + 1)]
        fig, ax = plt.subplots(figsize=(6, 4))
        for label in METHODS:
            keys = [f"{label} fold {fold} | CP" for fold in CURVE] + [f"{label} | CP"]
            ns = [n for n, k in zip([*CURVE.values(), 24], keys) if k in scores]
            rows = [scores[k] for k in keys if k in scores]
            lines.append(f"| {label} | " + " | ".join(cell(scores[k], "Tumor") if k in scores else "not run"
                                                      for k in keys) + " |")
            ax.errorbar(ns, [r["Tumor"] for r in rows], yerr=[[r["Tumor"] - r["Tumor_low"] for r in rows],
                                                            [r["Tumor_high"] - r["Tumor"] for r in rows]],
                        marker="o", capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks([*CURVE.values(), 24], [str(n) for n in [*CURVE.values(), 24]])
        ax.set_xlabel("CT+PET training cases (MDA)")
        ax.set_ylabel("GTVp Dice, CT+PET input")
        ax.set_title(f"{rec['iterations']} iterations each; CT base {rec['base_iterations']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(bench.out / "learning_curve.png", dpi=120)
    seconds = rec["train_seconds"]
    lines += ["", "Training wall time (s): " + ", ".join(f"{k} {v}" for k, v in seconds.items())]
    bench.save()
    text = "\n".join(lines) + "\n"
    (bench.out / "pemma_cnn.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--base-iterations", type=int, default=1000)
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--skip-curve", action="store_true", help="the 24-case comparison and the update only")
    parser.add_argument("--train-norms", action="store_true", help="also PEMMA with trained norm shifts")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at a time (one CPU thread each)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: score the models OUT holds, report (missing curve points: 'not run')")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    bench = Bench(out, args.base_iterations, args.iterations)
    bench.prepare()
    base = bench.checkpoint(501, "nnUNetPresetTrainer", bench.base_config, 0)
    adapted = bench.checkpoint(502, "PEMMACNNTrainer", bench.config, 0)
    c, b = bench.config, bench.base_config
    jobs = [(501, "nnUNetPresetTrainer", 0, None, b), (502, "nnUNetChannelDropoutTrainer", 0, None, c),
            (502, "PEMMACNNTrainer", 0, base, c), (502, "EarlyFusionCNNTrainer", 0, base, c),
            (503, "PEMMACNNContinualTrainer", 0, adapted, c),
            (502, "nnUNetChannelDropoutTrainer", 0, None, b)]  # from scratch with the CT base's budget
    if args.train_norms:
        jobs.append((502, "PEMMACNNTrainer_trainNorms", 0, base, c))
    if not args.skip_curve:  # the points never run before first
        jobs += [(502, trainer, fold, base if trainer in FROM_BASE else None, c)
                 for fold in sorted(CURVE, reverse=True) for trainer in METHODS.values()]
    labels = {trainer: label for label, trainer in METHODS.items()}

    def score_curve(number: int, trainer: str, fold: int, config: str) -> None:
        if fold in CURVE:  # scored as soon as trained: a run cut short keeps the points it has
            bench.score(f"{labels[trainer]} fold {fold}", number, trainer, config, fold, "CP")

    if args.report_only:
        for number, trainer, fold, _, config in jobs:
            if fold in CURVE and bench.checkpoint(number, trainer, config, fold).is_file():
                score_curve(number, trainer, fold, config)
    else:
        bench.train_all(jobs, args.jobs, score_curve)
    bench.score("CT base", 501, "nnUNetPresetTrainer", bench.base_config, 0, "C")
    variants = {"PEMMA (CNN), norms trained": "PEMMACNNTrainer_trainNorms"} if args.train_norms else {}
    for label, trainer in {**METHODS, **variants}.items():
        for infer in INPUTS:
            bench.score(label, 502, trainer, bench.config, 0, infer)
    for infer in INPUTS:
        bench.score("PEMMA (CNN) after CT-only HGJ update", 503, "PEMMACNNContinualTrainer", bench.config, 0, infer)
        bench.score(LONG_SCRATCH, 502, "nnUNetChannelDropoutTrainer", bench.base_config, 0, infer)
    bench.score("PEMMA (CNN) after CT-only HGJ update on HGJ", 503, "PEMMACNNContinualTrainer", bench.config, 0, "C",
                centre=503)
    bench.score("PEMMA (CNN) on HGJ", 502, "PEMMACNNTrainer", bench.config, 0, "C", centre=503)
    bench.score("CT base on HGJ", 501, "nnUNetPresetTrainer", bench.base_config, 0, "C", centre=503)
    update = bench.checkpoint(503, "PEMMACNNContinualTrainer", bench.config, 0)
    base_weights = torch.load(base, map_location="cpu", weights_only=False)["network_weights"]
    updated = torch.load(update, map_location="cpu", weights_only=False)["network_weights"]
    adapted_weights = torch.load(adapted, map_location="cpu", weights_only=False)["network_weights"]
    bench.record["update_base_bit_identical"] = all(torch.equal(updated[k], v) for k, v in base_weights.items())
    bench.record["update_pet_slot_bit_identical"] = all(torch.equal(updated[k], v) for k, v in adapted_weights.items()
                                                        if "pet_" in k or "conv_lora_" in k)
    bench.save()
    print(report(bench, not args.skip_curve))


if __name__ == "__main__":
    main()
