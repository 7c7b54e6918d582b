"""Training-step time and peak memory, inference time per case and file sizes of PEMMA next to its peers, each
network trained by its own nnU-Net trainer, measured in one run on one machine with the same patch, batch and
inference volume.

    python benchmarks/speed_memory.py [--preset tiny|paper] [--device cpu|cuda] [--steps N] [--json OUT]

Default: the paper preset on CUDA when a GPU is present, else the tiny preset on CPU (a few minutes on 2 cores).

How
    benchmarks/workspace.py makes nnU-Net folders with the README's commands on a one-case phantom (a temporary
    folder, or --workspace DIR, kept and reused; the peers' configurations only for the --setups that need
    them). Each setup is a benchmarking trainer of
    nnunetv2_pemma.trainers.benchmarking.step_timing: the real trainer, started as nnUNetv2_train starts it,
    whose step is its own nnU-Net ``train_step`` (forward, the loss of ``_build_loss``, backward, clipping at 12,
    optimiser step; autocast fp16 with GradScaler on CUDA) on one random batch of the preset's batch and patch
    that stays on the device (nnU-Net's noDataLoading benchmark does the same):
      - CT UNETR          UNETRTrainer on CT;
      - PEMMA adaptation  PEMMATrainer on CT+PET from a CT base (PET modules and LoRA train);
      - PEMMA-DoRA, -priors (tokens, fusion), -MoA adaptation: the other adaptation methods' trainers, likewise;
      - PEMMA continual   PEMMAContinualTrainer on CT from a PEMMA model (LoRA trains);
      - early fusion      EarlyFusionTrainer on CT+PET from a CT base (everything trains);
      - nnU-Net U-Net     nnUNetTrainer on CT+PET, 3d_fullres as nnU-Net planned it for the phantom, at the
                          preset's patch and batch (deep supervision, SGD);
      - H2ASeg            H2ASegTrainer on CT+PET from scratch (its preset at this size: h2aseg_tiny, _demo or
                          h2aseg), deep supervision at every level, Adam;
      - 2.5D network      SliceInteractionTrainer on CT+PET (2d configuration: slice patches at that preset's
                          patch and batch, k neighbouring slices per modality), nnU-Net's deep supervision, SGD.
    Training step: median over --steps rounds after --warmup rounds, the trainers' steps interleaved round robin,
    so that load from other processes on a shared machine hits every trainer alike. On CPU torch runs one
    intra-op thread unless --threads says otherwise: with as many OpenMP threads as cores a co-tenant process
    makes the threads wait for each other at every barrier, and the numbers that matter are ratios.
    Peak memory of a training step, each trainer alone (benchmarks/measure.py): CUDA: max_memory_allocated after
    warm-up minus what was allocated before the trainer was built; CPU: a fresh process per trainer, peak RSS
    increase and live tensor bytes plus the profiler's allocation peak during one step.
    Inference time per case: nnU-Net's predictor (sliding window with the trainer's patch, step 0.5, Gaussian,
    no mirroring, as nnU-Net's validation builds it from the trainer) with each trained network on one random
    volume (tiny: 32x48x48, paper: 192^3): logits and argmax. PEMMA (C) is the PEMMA model fed CT alone, i.e.
    the network of the continual-update trainer.
    Files: checkpoint_final.pth and PEMMA's adapter file as the trainers' on_train_end write them after the steps.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Iterator

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

import measure
import workspace
from nnunetv2_pemma.inference.slice_stack_predictor import SliceStackPredictor
from nnunetv2_pemma.trainers.benchmarking.step_timing import (EarlyFusionCNNTrainer_stepTiming,
                                                               EarlyFusionTrainer_stepTiming,
                                                               H2ASegTrainer_stepTiming,
                                                               PEMMACNNTrainer_stepTiming,
                                                               PEMMAContinualTrainer_stepTiming,
                                                               PEMMADoRATrainer_stepTiming,
                                                               PEMMAMoATrainer_stepTiming,
                                                               PEMMAPriorTokensTrainer_stepTiming,
                                                               PEMMAPriorTrainer_stepTiming,
                                                               PEMMATrainer_stepTiming,
                                                               SliceInteractionTrainer_stepTiming, StepTiming,
                                                               UNETRTrainer_stepTiming,
                                                               nnUNetChannelDropoutTrainer_stepTiming,
                                                               nnUNetTrainer_stepTiming)


@dataclass(frozen=True)
class Setup:
    label: str
    trainer: type[StepTiming]
    dataset: str  # "ct" or "ctpet"
    configuration: str  # the workspace's "unetr", "unet", "cnn" (unet preset), "h2aseg" or "slices25d" one
    start: str | None  # the checkpoint it adapts: "ct_base", "pemma" or none


SETUPS = {
    "ct_unetr": Setup("CT UNETR (UNETRTrainer, CT)", UNETRTrainer_stepTiming, "ct", "unetr", None),
    "pemma_adaptation": Setup("PEMMA adaptation (CT+PET)", PEMMATrainer_stepTiming, "ctpet", "unetr", "ct_base"),
    "pemma_dora": Setup("PEMMA-DoRA adaptation (CT+PET)", PEMMADoRATrainer_stepTiming, "ctpet", "unetr", "ct_base"),
    "pemma_prior": Setup("PEMMA-priors adaptation, fusion (CT+PET)", PEMMAPriorTrainer_stepTiming, "ctpet", "unetr",
                         "ct_base"),
    "pemma_prior_tokens": Setup("PEMMA-priors adaptation, tokens (CT+PET)", PEMMAPriorTokensTrainer_stepTiming,
                                "ctpet", "unetr", "ct_base"),
    "pemma_moa": Setup("PEMMA-MoA adaptation (CT+PET)", PEMMAMoATrainer_stepTiming, "ctpet", "unetr", "ct_base"),
    "pemma_continual": Setup("PEMMA continual (CT only)", PEMMAContinualTrainer_stepTiming, "ct", "unetr", "pemma"),
    "early_fusion": Setup("Early fusion (CT+PET)", EarlyFusionTrainer_stepTiming, "ctpet", "unetr", "ct_base"),
    "unet": Setup("nnU-Net 3d_fullres U-Net (CT+PET)", nnUNetTrainer_stepTiming, "ctpet", "unet", None),
    "unet_channel_dropout": Setup("nnU-Net U-Net, channel dropout (CT+PET)", nnUNetChannelDropoutTrainer_stepTiming,
                                  "ctpet", "cnn", None),
    "early_fusion_cnn": Setup("Early fusion on nnU-Net's U-Net (CT+PET)", EarlyFusionCNNTrainer_stepTiming, "ctpet",
                              "cnn", "cnn_base"),
    "pemma_cnn": Setup("PEMMA on nnU-Net's U-Net (CT+PET)", PEMMACNNTrainer_stepTiming, "ctpet", "cnn", "cnn_base"),
    "h2aseg": Setup("H2ASeg (CT+PET)", H2ASegTrainer_stepTiming, "ctpet", "h2aseg", None),
    "slices25d": Setup("2.5D slice interaction (CT+PET, 2d)", SliceInteractionTrainer_stepTiming, "ctpet",
                       "slices25d", None),
}
EARLY, UNET = "early_fusion", "unet"
INFERENCE = {  # row: (setup whose network predicts, label)
    "ct_unetr_C": ("ct_unetr", "CT UNETR (C)"),
    "pemma_C": ("pemma_continual", "PEMMA (C)"),
    "pemma_CP": ("pemma_adaptation", "PEMMA (CP)"),
    "early_fusion_CP": ("early_fusion", "Early fusion (CP)"),
    "unet_CP": ("unet", "nnU-Net U-Net (CP)"),
    "h2aseg_CP": ("h2aseg", "H2ASeg (CP)"),
    "slices25d_CP": ("slices25d", "2.5D slice interaction (CP)"),
}
PEER_OF_CONFIGURATION = {"h2aseg": "h2aseg", "slices25d": "slices25d", "cnn": "unet"}  # workspace.PEERS
VOLUMES = {"tiny": (32, 48, 48), "demo": (32, 48, 48), "paper": (192, 192, 192)}
DEFAULTS = {"cpu": {"warmup": 3, "steps": 10, "cases": 5, "threads": 1},
            "cuda": {"warmup": 5, "steps": 20, "cases": 5, "threads": None}}


@contextlib.contextmanager
def output_to(log: str) -> Iterator[None]:
    """nnU-Net's console output (plans, loaded keys, its training log) into `log`; stdout keeps the tables."""
    with open(log, "a") as out, contextlib.redirect_stdout(out):
        yield


def start(setup: Setup, ws: workspace.Workspace, device: str, log: str) -> StepTiming:
    """The setup's trainer at its first step; nnU-Net's console output goes to `log`. Picklable through
    functools.partial, for the fresh memory processes."""
    dataset = ws.ct if setup.dataset == "ct" else ws.ctpet
    configuration = getattr(ws, f"{setup.configuration}_configuration")
    weights = None if setup.start is None else getattr(ws, setup.start)
    with output_to(log):
        return setup.trainer.started(dataset, configuration, device, weights)


def predictor(trainer: StepTiming) -> nnUNetPredictor:
    """nnU-Net's predictor around the trainer's network, as its final validation builds it (no mirroring)."""
    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    options = dict(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, device=trainer.device, verbose=False,
                   verbose_preprocessing=False, allow_tqdm=False)
    slices = getattr(trainer.pemma.model, "slices", None) if hasattr(trainer, "pemma") else None
    p = nnUNetPredictor(**options) if slices is None else SliceStackPredictor(slices=slices, **options)
    p.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager, None,
                            trainer.dataset_json, type(trainer).__name__, None)
    return p


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    info = {"python": platform.python_version(), "torch": torch.__version__, "nnunetv2": version("nnunetv2"),
            "monai": version("monai"), "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device)}
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return info


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(ws: workspace.Workspace, names: list[str], device: torch.device, warmup: int, steps: int, cases: int,
        measure_memory: bool) -> dict[str, Any]:
    log = str(Path(ws.root) / "benchmark.log")
    builds = {n: functools.partial(start, SETUPS[n], ws, device.type, log) for n in names}
    result: dict[str, Any] = {"preset": ws.preset, "warmup_steps": warmup, "steps": steps, "cases": cases,
                              "machine": machine_info(device), "workspace": ws.root}
    t_start = time.perf_counter()

    if measure_memory:  # each trainer alone, before the others exist
        _progress("peak memory, one trainer at a time")
        result["memory"] = {n: {"cuda_peak_bytes": measure.cuda_peak_bytes(b, device, warmup=1, steps=2)}
                            if device.type == "cuda" else
                            measure.cpu_peak_in_fresh_process(b, warmup=1, steps=2, threads=torch.get_num_threads())
                            for n, b in builds.items()}

    _progress("starting the trainers")
    trainers = {n: b() for n, b in builds.items()}
    _progress(f"training steps, interleaved: {warmup} + {steps} rounds of {len(trainers)} trainers")
    losses: dict[str, list[float]] = {n: [] for n in names}

    def step(n: str) -> None:
        losses[n].append(float(trainers[n].timed_step()["loss"]))

    times = measure.interleaved_times({n: functools.partial(step, n) for n in trainers}, device, warmup, steps)
    result["train"] = {n: describe(SETUPS[n], t, times[n], losses[n]) for n, t in trainers.items()}

    with output_to(log):
        for t in trainers.values():
            t.on_train_end()  # writes checkpoint_final.pth (and PEMMA's adapter)
    result["files"] = {n: {f.name: f.stat().st_size for f in sorted(Path(t.output_folder).iterdir())
                           if f.suffix in (".pth", ".safetensors")} for n, t in trainers.items()}

    rows = {row: (s, label) for row, (s, label) in INFERENCE.items() if s in trainers}
    if rows:
        _progress(f"inference, interleaved: 1 + {cases} cases of {len(rows)} networks")
        volume = torch.randn(2, *VOLUMES[ws.preset], generator=torch.Generator().manual_seed(1))
        with output_to(log):
            predictors = {s: predictor(trainers[s]) for s, _ in rows.values()}

        def predict(s: str) -> torch.Tensor:
            with torch.inference_mode():
                channels = trainers[s].num_input_channels
                return predictors[s].predict_sliding_window_return_logits(volume[:channels]).argmax(0)

        case_times = measure.interleaved_times({row: functools.partial(predict, s) for row, (s, _) in rows.items()},
                                               device, 1, cases)
        result["volume"] = list(VOLUMES[ws.preset])
        result["inference"] = {row: {"label": label, "case_s_median": statistics.median(case_times[row]),
                                     "case_s_min": min(case_times[row]), "case_s_all": case_times[row]}
                               for row, (_, label) in rows.items()}
    result["wall_s"] = time.perf_counter() - t_start
    return result


def describe(setup: Setup, trainer: StepTiming, times: list[float], losses: list[float]) -> dict[str, Any]:
    """The step times and what the trainer trained: parameters, frozen ones left alone, its nnU-Net parts."""
    params = dict(trainer.network.named_parameters())
    frozen = [p for p in params.values() if not p.requires_grad]
    return {
        "label": setup.label, "trainer": type(trainer).__name__, "dataset": trainer.plans_manager.dataset_name,
        "configuration": trainer.configuration_name, "network": type(trainer.network).__name__,
        "patch_size": [int(p) for p in trainer.configuration_manager.patch_size], "batch_size": trainer.batch_size,
        "input_channels": trainer.num_input_channels, "optimizer": type(trainer.optimizer).__name__,
        "loss": type(trainer.loss).__name__, "grad_scaler": trainer.grad_scaler is not None,
        "params": sum(p.numel() for p in params.values()),
        "trainable": sum(p.numel() for p in params.values() if p.requires_grad),
        "frozen_tensors": len(frozen), "frozen_with_grad": sum(p.grad is not None for p in frozen),
        "frozen_with_optimizer_state": sum(p in trainer.optimizer.state for p in frozen),
        "loss_first_last": [losses[0], losses[-1]],
        "step_s_median": statistics.median(times), "step_s_min": min(times), "step_s_all": times,
    }


# --- report --------------------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if not a or not b else f"{a / b:.2f}x"


def _mib(b: float | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.1f}"


def markdown(result: dict[str, Any]) -> str:
    m, train, mem = result["machine"], result["train"], result.get("memory")
    first = next(iter(train.values()))
    device = (f"{m['gpu']} (CUDA {m['cuda']}, autocast fp16)" if "gpu" in m else
              f"{m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads, fp32)")
    lines = [
        f"## PEMMA speed and memory: preset `{result['preset']}` on {m['device']}",
        "",
        f"- machine: {device}; {m['platform']}; load average at start {m.get('load_average_at_start', 'n/a')}",
        f"- python {m['python']}, torch {m['torch']}, monai {m['monai']}, nnunetv2 {m['nnunetv2']}",
        f"- each step is the trainer's own nnU-Net train_step; patch {'x'.join(map(str, first['patch_size']))}, "
        f"batch {first['batch_size']}; median of {result['steps']} interleaved rounds after "
        f"{result['warmup_steps']} warm-up rounds",
    ]
    key = None if not mem else "cuda_peak_bytes" if "cuda_peak_bytes" in next(iter(mem.values())) else \
        "tensor_peak_bytes"
    rss = key == "tensor_peak_bytes"
    if key:
        lines.append("- peak memory of a training step, each trainer alone: " + (
            "live tensor bytes + profiler allocation peak of one step, and the peak RSS increase, in a fresh process"
            if rss else "torch.cuda.max_memory_allocated minus what was allocated before the trainer"))
    header = ("| setup | trainable / total params | step (ms) | vs early fusion | vs nnU-Net U-Net | peak memory (MiB) "
              "| vs early fusion | vs nnU-Net U-Net |" + (" peak RSS increase (MiB) |" if rss else ""))
    lines += ["", "### Training step", "", header, "|---" * header.count(" | ") + "|---|"]
    step_ref = {r: train[r]["step_s_median"] if r in train else None for r in (EARLY, UNET)}
    mem_ref = {r: mem[r][key] if key and r in mem else None for r in (EARLY, UNET)}
    for n, t in train.items():
        step = t["step_s_median"]
        row = (f"| {t['label']} | {t['trainable']:,} / {t['params']:,} | {1000 * step:,.1f} "
               f"| {_ratio(step, step_ref[EARLY])} | {_ratio(step, step_ref[UNET])} |")
        if key:
            p = mem[n][key]
            row += f" {_mib(p)} | {_ratio(p, mem_ref[EARLY])} | {_ratio(p, mem_ref[UNET])} |"
            row += f" {_mib(mem[n]['rss_peak_bytes'])} |" if rss else ""
        else:
            row += " not measured | | |"
        lines.append(row)
    if "inference" in result:
        inf = result["inference"]
        inf_ref = {r: inf[r]["case_s_median"] if r in inf else None for r in ("early_fusion_CP", "unet_CP")}
        lines += ["", f"### Inference per case (nnU-Net's sliding window, no mirroring, "
                      f"{'x'.join(map(str, result['volume']))})", "",
                  "| setup | time per case (s) | fastest case (s) | vs early fusion (CP) | vs nnU-Net U-Net (CP) |",
                  "|---|---|---|---|---|"]
        for t in inf.values():
            c = t["case_s_median"]
            lines.append(f"| {t['label']} | {c:.3f} | {t['case_s_min']:.3f} | "
                         f"{_ratio(c, inf_ref['early_fusion_CP'])} | {_ratio(c, inf_ref['unet_CP'])} |")
    lines += ["", "### Files (as the trainers' on_train_end write them)", "", "| setup | file | MiB |", "|---|---|---|"]
    for n, files in result["files"].items():
        lines += [f"| {train[n]['label']} | {name} | {_mib(size)} |" for name, size in files.items()]
    lines += ["", "### Checks", ""]
    for t in train.values():
        lines.append(f"- {t['label']}: {t['trainer']} ({t['network']}, {t['input_channels']} input channels, "
                     f"{t['optimizer']}, {t['loss']}); {t['frozen_tensors']} tensors without requires_grad, "
                     f"{t['frozen_with_grad']} with a .grad, {t['frozen_with_optimizer_state']} with optimiser "
                     f"state; loss {t['loss_first_last'][0]:.3f} -> {t['loss_first_last'][1]:.3f}")
    lines.append(f"\nwall time of the measurements: {result['wall_s']:.0f} s, of the whole run (workspace "
                 f"included, imports excluded): {result['total_wall_s']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("tiny", "demo", "paper"), default=None,
                        help="network size and patch (default: paper on CUDA, tiny on CPU)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--steps", type=int, default=None, help="measured training steps per trainer "
                        "(default: 10 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default: 3 on CPU, 5 on CUDA)")
    parser.add_argument("--cases", type=int, default=None, help="measured inference cases per network (default: 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default on CPU: 1, "
                        "see the module docstring; on CUDA: torch's default)")
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS),
                        help="which trainers to measure (default: all)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--workspace", type=Path, default=None, metavar="DIR",
                        help="nnU-Net folders to make (or reuse, when made before for this preset) and keep "
                             "(default: a temporary folder)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="make (or reuse) the --workspace folders and exit without measuring: a later run with "
                             "the same --workspace measures at once (benchmarks/gpu_check.sh makes them on the CPU "
                             "while it prepares its own data)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write all numbers as JSON")
    parser.add_argument("--markdown", type=Path, default=None, metavar="OUT", help="also write the tables to OUT")
    args = parser.parse_args(argv)
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.prepare_only and args.workspace is None:
        parser.error("--prepare-only needs --workspace (a temporary folder would be removed at once)")
    if device_type == "cuda" and not torch.cuda.is_available() and not args.prepare_only:
        parser.error("--device cuda: no CUDA device is available")
    for name in ("steps", "warmup", "cases", "threads"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            parser.error(f"--{name} must be at least {0 if name == 'warmup' else 1}")
    preset = args.preset or ("paper" if device_type == "cuda" else "tiny")
    defaults = DEFAULTS[device_type]
    threads = args.threads or defaults["threads"]
    if threads is not None:
        torch.set_num_threads(threads)
    if device_type == "cuda":
        torch.backends.cudnn.benchmark = True  # as nnUNetv2_train
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        root = args.workspace or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pemma_bench_")))
        workspace.use(root)
        _progress(f"nnU-Net folders for preset {preset} in {root}")
        peers = {PEER_OF_CONFIGURATION.get(SETUPS[n].configuration) for n in args.setups}
        ws = workspace.prepare(root, preset, [p for p in workspace.PEERS if p in peers])
        if args.prepare_only:
            _progress(f"workspace ready: {root} (--prepare-only: nothing measured)")
            return
        result = run(ws, args.setups, torch.device(device_type),
                     warmup=defaults["warmup"] if args.warmup is None else args.warmup,
                     steps=args.steps or defaults["steps"], cases=args.cases or defaults["cases"],
                     measure_memory=not args.no_memory)
    result["total_wall_s"] = time.perf_counter() - started
    table = markdown(result)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
