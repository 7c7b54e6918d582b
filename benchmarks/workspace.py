"""nnU-Net folders for the benchmarking trainers, made with the README's commands on a one-case phantom.

Two datasets: CT (one CHUM case) for the CT UNETR and PEMMA's continual update, CT+PET (one MDA case) for PEMMA's
adaptation, early fusion, nnU-Net's U-Net and the peers (H2ASeg, the 2.5D network; their presets at the preset's
size, as `pemma compare` picks them). Planning needs images; the timed steps run on random batches, so
one case per dataset is enough. The preset's configuration comes from `pemma plans add/transfer`. nnU-Net's U-Net
gets a configuration `3d_fullres_<preset>` that inherits 3d_fullres (nnU-Net's plans inheritance, as in its
documentation's `3d_fullres_bs40`) with the preset's patch and batch, so every network sees the same input.

Then the starting points of the adapting trainers, written by nnU-Net's `save_checkpoint`: a CT base (the CT
UNETR as initialised) and a PEMMA model adapted from it (the start of a continual update), and, with the unet
peer, a CT model of nnU-Net's U-Net (the start of the CNN forms).

`prepare(root, preset, peers)` makes only the peers' configurations it is asked for (speed_memory.py asks for those
of its --setups); a workspace made before is reused, and peers it lacks are added to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from nnunetv2_pemma.environment import nnunet_variables, preset_folder
from nnunetv2_pemma.experiments.compare import peer_preset
from nnunetv2_pemma.plans import load_preset

BIN = Path(sys.executable).parent
CT_ID, CTPET_ID = 901, 902
RECORD = "workspace.json"
PEERS = ("h2aseg", "slices25d", "unet")  # peers' presets (`pemma compare`'s); "unet" also serves the CNN forms


@dataclass(frozen=True)
class Workspace:
    root: str
    preset: str
    ct: str  # nnU-Net dataset names
    ctpet: str
    unetr_configuration: str
    unet_configuration: str
    h2aseg_configuration: str  # the peers at the preset's size (`pemma compare`'s presets)
    slices25d_configuration: str
    ct_base: str  # checkpoints the adapting trainers start from
    pemma: str
    cnn_configuration: str = ""  # the unet preset at the preset's size: nnU-Net's U-Net with a "pemma" block
    cnn_base: str = ""  # the CT model of nnU-Net's U-Net the CNN forms start from
    peers: tuple[str, ...] = PEERS  # the peers whose configurations were made (a record without it: all)

    def __post_init__(self) -> None:
        object.__setattr__(self, "peers", tuple(self.peers))  # a list when read back from the JSON record


def use(root: Path) -> None:
    """Point nnU-Net (this process and the processes it starts) at the folders under `root`; torch.compile off
    unless nnUNet_compile says otherwise."""
    os.environ.update(nnunet_variables(root))
    os.environ.setdefault("nnUNet_compile", "false")
    os.environ.setdefault("nnUNet_def_n_proc", "1")


def _run(args: list[str], log: Path) -> None:
    exe = BIN / args[0]
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(args)}\n")
        out.flush()
        start = time.perf_counter()
        env = dict(os.environ)
        if args[0] == "nnUNetv2_plan_and_preprocess":  # the planner hands it to torch.set_num_threads, which rejects 0
            env.pop("nnUNet_n_proc_DA", None)
        done = subprocess.run([str(exe) if exe.exists() else args[0], *args[1:]], stdout=out, stderr=out, env=env)
        out.write(f"[{time.perf_counter() - start:.1f} s]\n")
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} exited {done.returncode}; see {log}")


def _add_unet_configuration(ws: Workspace) -> None:
    """nnU-Net's U-Net at the preset's patch and batch on the CT+PET dataset (after every `plans transfer`, which
    replaces that dataset's plans)."""
    preset = json.loads((preset_folder() / f"{ws.preset}.json").read_text())
    plans_file = Path(os.environ["nnUNet_preprocessed"]) / ws.ctpet / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"][ws.unet_configuration] = {"inherits_from": "3d_fullres",
                                                      "patch_size": preset["patch_size"],
                                                      "batch_size": preset["batch_size"]}
    plans_file.write_text(json.dumps(plans, indent=2))


def _starting_checkpoints(ws: Workspace, log: Path) -> None:
    from nnunetv2_pemma.trainers.benchmarking.step_timing import PEMMATrainer_stepTiming, UNETRTrainer_stepTiming

    with log.open("a") as out, contextlib.redirect_stdout(out):
        ct_base = UNETRTrainer_stepTiming.started(ws.ct, ws.unetr_configuration, "cpu")
        ct_base.save_checkpoint(ws.ct_base)
        pemma = PEMMATrainer_stepTiming.started(ws.ctpet, ws.unetr_configuration, "cpu", ws.ct_base)
        pemma.save_checkpoint(ws.pemma)


def _add_peers(ws: Workspace, peers: list[str], log: Path) -> Workspace:
    """The peers' configurations on both datasets (README: `pemma plans add/transfer`), and for the unet peer the
    CNN forms' CT base; the workspace with them recorded."""
    from nnunetv2_pemma.trainers.benchmarking.step_timing import nnUNetPresetTrainer_stepTiming

    for kind in peers:
        peer = peer_preset(kind, ws.preset)
        _run(["pemma", "plans", "add", str(CT_ID), "--preset", peer], log)
        _run(["pemma", "plans", "transfer", str(CT_ID), str(CTPET_ID), "--preset", peer], log)
        if kind == "unet":
            with log.open("a") as out, contextlib.redirect_stdout(out):
                nnUNetPresetTrainer_stepTiming.started(ws.ct, ws.cnn_configuration, "cpu").save_checkpoint(ws.cnn_base)
    made = set(ws.peers) | set(peers)
    return replace(ws, peers=tuple(p for p in PEERS if p in made))


def prepare(root: Path, preset_name: str, peers: tuple[str, ...] | list[str] = PEERS) -> Workspace:
    """The workspace under `root` for `preset_name` with the configurations of `peers` (default: all), made unless
    `root` already holds it (peers it lacks are added); `use(root)` first."""
    unknown = set(peers) - set(PEERS)
    if unknown:
        raise ValueError(f"unknown peers {sorted(unknown)}; known: {', '.join(PEERS)}")
    root = root.resolve()
    record = root / RECORD
    if record.is_file():
        ws = Workspace(**json.loads(record.read_text()))
        if ws.preset != preset_name:
            raise ValueError(f"{root} holds a workspace for preset {ws.preset}, not {preset_name}")
        missing = [p for p in PEERS if p in peers and p not in ws.peers]
        if missing:
            ws = _add_peers(ws, missing, root / "workspace.log")
            _add_unet_configuration(ws)
            record.write_text(json.dumps(asdict(ws), indent=2))
        return ws
    preset = json.loads((preset_folder() / f"{preset_name}.json").read_text())  # what `plans add` reads
    root.mkdir(parents=True, exist_ok=True)
    log = root / "workspace.log"
    ct, ctpet = f"Dataset{CT_ID}_BenchCT", f"Dataset{CTPET_ID}_BenchCTPET"
    results = Path(os.environ["nnUNet_results"])
    configuration = {kind: load_preset(peer_preset(kind, preset_name)).configuration for kind in PEERS}
    ws = Workspace(str(root), preset_name, ct, ctpet, preset["configuration"], f"3d_fullres_{preset_name}",
                   configuration["h2aseg"], configuration["slices25d"],
                   ct_base=str(results / "checkpoint_ct_base.pth"), pemma=str(results / "checkpoint_pemma.pth"),
                   cnn_configuration=configuration["unet"], cnn_base=str(results / "checkpoint_cnn_base.pth"),
                   peers=())
    phantom = root / "phantom"
    _run(["pemma", "phantom", str(phantom), "--cases-per-center", "1"], log)
    _run(["pemma", "convert-hecktor", str(phantom), "--dataset-id", str(CT_ID), "--name", "BenchCT", "--centers",
          "CHUM", "--modalities", "CT"], log)
    _run(["nnUNetv2_plan_and_preprocess", "-d", str(CT_ID), "-c", "3d_fullres", "-np", "1", "-npfp", "1"], log)
    _run(["pemma", "plans", "add", str(CT_ID), "--preset", preset_name], log)
    _run(["pemma", "convert-hecktor", str(phantom), "--dataset-id", str(CTPET_ID), "--name", "BenchCTPET",
          "--centers", "MDA", "--modalities", "CT", "PET"], log)
    _run(["pemma", "plans", "transfer", str(CT_ID), str(CTPET_ID), "--preset", preset_name], log)
    ws = _add_peers(ws, [p for p in PEERS if p in peers], log)
    _add_unet_configuration(ws)
    _starting_checkpoints(ws, log)
    record.write_text(json.dumps(asdict(ws), indent=2))
    return ws
