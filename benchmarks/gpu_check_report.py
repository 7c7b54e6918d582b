"""The results of benchmarks/gpu_check.sh as one Markdown file and one JSON file in its output folder.

    python benchmarks/gpu_check_report.py --out DIR --device cuda|cpu --preset P --configuration C [--command CMD]

Reads what the script left in DIR: timings.tsv (stage, start, end, exit code), speed_memory.json (when that stage
ran), the short trainings' checkpoints and the predictions; writes DIR/gpu_check.md and DIR/gpu_check.json.
Missing pieces (a failed or skipped stage) are reported as such, never invented.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from importlib.metadata import version
from pathlib import Path
from typing import Any

import SimpleITK as sitk
import torch

TRAININGS = {  # stage: (label, dataset folder, trainer, fold)
    "train_ct_base": ("CT base (UNETRTrainer, CT)", "Dataset501_CT", "UNETRTrainer", "fold_0"),
    "train_pemma": ("PEMMA (PEMMATrainer from the CT base, CT+PET)", "Dataset502_CTPET", "PEMMATrainer", "fold_all"),
}
PREDICTIONS = {  # stage: (label, input and output folder name)
    "predict_ctpet": ("PEMMA, CT+PET (nnUNetv2_predict)", "ctpet"),
    "predict_ct": ("PEMMA, CT only (pemma predict --modalities CT)", "ct"),
    "predict_pet": ("PEMMA, PET only (pemma predict --modalities PET)", "pet"),
}


def device_name(device: str) -> str:
    if device == "cpu":
        return "CPU"
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CUDA (no device visible to the report)"


def host_cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def read_stages(out: Path) -> dict[str, dict[str, Any]]:
    stages = {}
    timings = out / "timings.tsv"
    for line in timings.read_text().splitlines() if timings.is_file() else []:
        name, start, end, code = line.split("\t")
        code = int(code)
        stages[name] = {"wall_s": round(float(end) - float(start), 2), "exit_code": code,
                        "status": "ok" if code == 0 else "not started (--budget spent)" if code == -1 else
                        "over its time limit" if code in (124, 137) else "failed",
                        "log": f"logs/{name}.log"}
    return stages


def speed_rows(speed: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per setup speed_memory measured: its median step and its peak memory (CUDA: max_memory_allocated
    over the trainer's steps; CPU: live tensor bytes + the profiler's allocation peak of one step)."""
    memory = speed.get("memory") or {}
    rows = []
    for setup, t in speed["train"].items():
        m = memory.get(setup, {})
        peak = m.get("cuda_peak_bytes", m.get("tensor_peak_bytes"))
        rows.append({"setup": setup, "label": t["label"], "trainer": t["trainer"],
                     "trainable_params": t["trainable"], "params": t["params"],
                     "step_ms": 1000 * t["step_s_median"], "step_ms_min": 1000 * t["step_s_min"],
                     "peak_memory_mib": None if peak is None else peak / 2**20,
                     "peak_rss_increase_mib": None if m.get("rss_peak_bytes") is None else m["rss_peak_bytes"] / 2**20})
    return rows


def image_size(path: Path) -> list[int] | None:
    if not path.is_file():
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return list(reader.GetSize())


def predictions(out: Path, stages: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    result = {}
    for stage, (label, folder) in PREDICTIONS.items():
        inputs = sorted((out / "inputs" / folder).glob("*_0000.nii.gz"))
        case = inputs[0].name[:-len("_0000.nii.gz")] if inputs else None
        ct = out / "inputs" / "ctpet" / f"{case}_0000.nii.gz" if case else None
        mask = out / "predictions" / folder / f"{case}.nii.gz" if case else None
        size = image_size(mask) if mask else None
        ct_size = image_size(ct) if ct else None
        result[stage] = {"label": label, "case": case, **stages.get(stage, {"status": "not run"}),
                         "prediction": str(mask) if size else None, "size": size, "ct_size": ct_size,
                         "size_matches_ct": size is not None and size == ct_size}
    return result


def trainings(out: Path, configuration: str, stages: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    result = {}
    for stage, (label, dataset, trainer, fold) in TRAININGS.items():
        checkpoint = (out / "nnUNet_data" / "nnUNet_results" / dataset / f"{trainer}__nnUNetPlans__{configuration}"
                      / fold / "checkpoint_final.pth")
        result[stage] = {"label": label, **stages.get(stage, {"status": "not run"}),
                         "checkpoint": str(checkpoint) if checkpoint.is_file() else None,
                         "checkpoint_mib": checkpoint.stat().st_size / 2**20 if checkpoint.is_file() else None}
    return result


def _f(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _size(size: list[int] | None, missing: str) -> str:
    return "x".join(map(str, size)) if size else missing


def markdown(report: dict[str, Any]) -> str:
    v = report["versions"]
    cuda = f" (CUDA {v['cuda']}, cuDNN {v['cudnn']})" if v["cuda"] else ""
    lines = [f"## Device check on {report['device']}: preset `{report['preset']}` ({report['date']})", "",
             f"- torch {v['torch']}{cuda}, nnunetv2 {v['nnunetv2']}, monai {v['monai']}, python {v['python']}; "
             f"host CPU {report['host_cpu']}",
             f"- `{report['command'].strip()}`: configuration `{report['configuration']}`, 10 training iterations; "
             f"whole run {_f(report['total_wall_s'], 0)} s"
             + ("" if report["ok"] else "; **some stages failed** (table at the end)"), ""]
    speed = report["speed_memory"]
    lines += ["### Training step and peak memory (`benchmarks/speed_memory.py`)", ""]
    if speed is None:
        lines += ["not measured (the speed_memory stage failed or did not run)", ""]
    else:
        lines += [f"Each trainer's own nnU-Net `train_step` ({speed['precision']}) on a random batch of the preset's "
                  f"patch and batch; step: median of {speed['steps']} interleaved rounds after {speed['warmup']} "
                  f"warm-up rounds; peak memory: {speed['memory_measure']}. All tables: `speed_memory.md`.", "",
                  "| method | trainer | trainable / total params | step (ms) | peak memory (MiB) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['label']} | {r['trainer']} | {r['trainable_params']:,} / {r['params']:,} | "
                  f"{_f(r['step_ms'])} | {_f(r['peak_memory_mib'])} |" for r in speed["methods"]]
        if speed["inference"]:
            lines += ["", f"Inference per case, nnU-Net's sliding window without mirroring on a "
                          f"{'x'.join(map(str, speed['volume']))} volume:", "", "| network (input) | s per case |",
                      "|---|---|"]
            lines += [f"| {r['label']} | {_f(r['case_s'], 3)} |" for r in speed["inference"]]
        lines.append("")
    lines += ["### Short trainings (`nnUNetv2_train`, 10 iterations, final validation included)", "",
              "| training | wall time (s) | status | checkpoint_final.pth (MiB) |", "|---|---|---|---|"]
    lines += [f"| {t['label']} | {_f(t.get('wall_s'))} | {t['status']} | {_f(t['checkpoint_mib'])} |"
              for t in report["trainings"].values()]
    lines += ["", "### Predictions (one held-out MDA case)", "",
              "| prediction | wall time (s) | status | mask size | CT size |", "|---|---|---|---|---|"]
    lines += [f"| {p['label']} | {_f(p.get('wall_s'))} | {p['status']} | {_size(p['size'], 'none')} | "
              f"{_size(p['ct_size'], 'n/a')} |" for p in report["predictions"].values()]
    lines += ["", "### Every stage", "", "| stage | wall time (s) | status | exit code | log |",
              "|---|---|---|---|---|"]
    lines += [f"| {name} | {_f(s['wall_s'])} | {s['status']} | {s['exit_code']} | `{s['log']}` |"
              for name, s in report["stages"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="gpu_check.sh's output folder")
    parser.add_argument("--device", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--configuration", required=True, help="the short preset's configuration")
    parser.add_argument("--command", default=None, help="the gpu_check.sh command line, for the report")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    stages = read_stages(out)
    speed = None
    speed_file = out / "speed_memory.json"
    if stages.get("speed_memory", {}).get("exit_code") == 0 and speed_file.is_file():
        raw = json.loads(speed_file.read_text())
        memory = next(iter((raw.get("memory") or {}).values()), {})
        speed = {"json": str(speed_file), "steps": raw["steps"], "warmup": raw["warmup_steps"],
                 "precision": "autocast fp16 with GradScaler" if args.device == "cuda" else "fp32",
                 "memory_measure": "torch.cuda.max_memory_allocated minus what was allocated before the trainer"
                 if "cuda_peak_bytes" in memory else "live tensor bytes + the profiler's allocation peak of one step "
                 "(fresh process)" if memory else "not measured",
                 "methods": speed_rows(raw), "volume": raw.get("volume"),
                 "inference": [{"row": k, "label": r["label"], "case_s": r["case_s_median"]}
                               for k, r in raw.get("inference", {}).items()]}
    starts = [float(line.split("\t")[1]) for line in (out / "timings.tsv").read_text().splitlines()] \
        if (out / "timings.tsv").is_file() else []
    ends = [float(line.split("\t")[2]) for line in (out / "timings.tsv").read_text().splitlines()] if starts else []
    report = {
        "device": device_name(args.device), "device_type": args.device, "preset": args.preset,
        "configuration": args.configuration, "date": datetime.date.today().isoformat(),
        "command": args.command or f"bash benchmarks/gpu_check.sh --device {args.device} --preset {args.preset}",
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda if args.device == "cuda" else None,
                     "cudnn": torch.backends.cudnn.version() if args.device == "cuda" else None,
                     "nnunetv2": version("nnunetv2"), "monai": version("monai"),
                     "python": platform.python_version()},
        "host_cpu": host_cpu(),
        "total_wall_s": max(ends) - min(starts) if starts else None,
        "speed_memory": speed, "trainings": trainings(out, args.configuration, stages),
        "predictions": predictions(out, stages), "stages": stages,
    }
    report["ok"] = bool(stages) and all(s["exit_code"] == 0 for s in stages.values()) and speed is not None and all(
        p["size_matches_ct"] for p in report["predictions"].values())
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))


if __name__ == "__main__":
    main()
