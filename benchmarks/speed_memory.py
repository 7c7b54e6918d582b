"""Training-step time and peak memory, inference time per case and file sizes of PEMMA next to its peers, measured
in one run on one machine with the same patch, batch and volume for every network.

    python benchmarks/speed_memory.py [--preset tiny|paper] [--device cpu|cuda] [--steps N] [--json OUT]

Default: the paper preset on CUDA when a GPU is present, else the tiny preset on CPU (a few minutes on 2 cores).

What is measured
    Training step (one optimiser step as nnU-Net's ``train_step`` does it: forward, DC_and_CE_loss with nnU-Net's
    arguments, backward, gradient clipping at 12, optimiser step; autocast on CUDA), on random data of the preset's
    batch and patch, for
      - CT UNETR          ``UNETRTrainer`` on CT: ``build_unetr(model, 1, 3, patch)``, everything trains;
      - PEMMA adaptation  ``PEMMAUNETR`` on CT+PET, ``freeze_for_adaptation`` (PET modules + LoRA train);
      - PEMMA continual   ``PEMMAUNETR`` on a CT-only dataset (PET a zero image), ``freeze_for_continual`` (LoRA);
      - early fusion      ``EarlyFusionUNETR`` on CT+PET, everything trains (the peer a user would otherwise pick);
      - nnU-Net U-Net     the ``PlainConvUNet`` nnU-Net's default planner gives 3d_fullres at this patch size
                          (isotropic spacing), 2 input channels (CT+PET), deep supervision on and nnU-Net's own
                          optimiser (SGD, momentum 0.99, Nesterov); the UNETR trainers use AdamW as the presets say.
    Steps of all networks are interleaved (round robin), so that load from other processes on a shared machine
    hits every network alike; the table gives the median. On CPU torch runs one intra-op thread unless
    ``--threads`` says otherwise: the numbers that matter are ratios, and with as many OpenMP threads as cores a
    co-tenant process makes the threads wait for each other at every barrier (on a shared 2-core machine steps
    then took 0.3 to 9 s instead of a steady 0.2 s).

    Peak memory of a training step, per network in isolation:
      - CUDA: ``torch.cuda.max_memory_allocated`` over the steps after a warm-up step (which creates the optimiser
        state and lets cudnn.benchmark try its algorithms), minus what was allocated before the network was built:
        weights + gradients + optimiser state + batch + activations; the caching allocator's reserve is not
        counted.
      - CPU: PyTorch keeps no CPU allocator statistics, so every network runs in a fresh process (multiprocessing
        spawn), with two numbers:
          peak memory: the same quantity as on CUDA, in tensor bytes: the distinct storages alive before a step
            (weights, buffers, gradients, optimiser state, batch) plus the highest running sum of the allocations
            and frees that ``torch.profiler(profile_memory=True)`` records during one more step;
          peak RSS increase: what the OS had to provide. The process first runs every kind of op on tiny
            tensors, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), builds the network and runs
            the steps; reported is VmHWM minus VmRSS just before the build (``ru_maxrss`` where ``clear_refs`` is
            missing). It includes glibc's and oneDNN's slack (some 50 MiB at the tiny preset) that is not any
            tensor's, so its differences between networks are smaller than the tensor ones.

    Inference time per case: MONAI ``sliding_window_inference`` (the preset's patch, overlap 0.5, Gaussian
    weighting, one window per forward pass, no mirroring, as nnU-Net predicts), then argmax, over one volume
    (tiny: 32x48x48, paper: 192^3), for CT UNETR (C), PEMMA (C and CP; LoRA as trained and merged into qkv with
    ``merge_lora_for_inference``), early fusion (CP) and the nnU-Net U-Net (CP).

    Files: the PEMMA adapter (safetensors of the ``is_adapter_key`` tensors) next to ``torch.save`` checkpoints as
    nnU-Net writes them (network weights + optimiser state, after the measured steps).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

import monai
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from monai.inferers import sliding_window_inference
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from safetensors.torch import save_file
from tqdm import tqdm

from nnunetv2_pemma.adaptation.adapter import is_adapter_key
from nnunetv2_pemma.networks import PEMMAUNETR, build_unetr, freeze_for_adaptation, freeze_for_continual
from nnunetv2_pemma.networks.early_fusion import EarlyFusionUNETR
from nnunetv2_pemma.networks.lora import LoRAQKVLinear
from nnunetv2_pemma.networks.merge import merge_lora_for_inference
from nnunetv2_pemma.plans import load_preset

NUM_CLASSES = 3  # background, GTVp, GTVn
TRAIN_SETUPS = {
    "ct_unetr": "CT UNETR (UNETRTrainer, CT)",
    "pemma_adaptation": "PEMMA adaptation (CT+PET)",
    "pemma_continual": "PEMMA continual (CT only)",
    "early_fusion": "Early fusion (CT+PET)",
    "unet": "nnU-Net 3d_fullres U-Net (CT+PET)",
}
EARLY, UNET = "early_fusion", "unet"
INFERENCE_SETUPS = {
    "ct_unetr_C": "CT UNETR (C)",
    "pemma_C": "PEMMA (C)",
    "pemma_C_merged": "PEMMA (C), LoRA merged",
    "pemma_CP": "PEMMA (CP)",
    "pemma_CP_merged": "PEMMA (CP), LoRA merged",
    "early_fusion_CP": "Early fusion (CP)",
    "unet_CP": "nnU-Net U-Net (CP)",
}
EARLY_INF, UNET_INF = "early_fusion_CP", "unet_CP"
VOLUMES = {"tiny": (32, 48, 48), "paper": (192, 192, 192)}
DEFAULTS = {"cpu": {"warmup": 3, "steps": 10, "cases": 5, "threads": 1},
            "cuda": {"warmup": 5, "steps": 20, "cases": 5, "threads": None}}


# --- networks, loss, optimiser -------------------------------------------------------------------------------


def nnunet_unet_plan(patch_size: tuple[int, ...]) -> dict[str, Any]:
    """Architecture part of the plan nnU-Net's default ExperimentPlanner writes for 3d_fullres at ``patch_size``.

    Same rules as ``ExperimentPlanner.get_plans_for_configuration`` for isotropic 1 mm spacing whose patch is
    not reduced further: topology from ``get_pool_and_conv_props`` (feature maps down to an edge of 4), 32 base
    features doubling per stage up to 320, two convolutions per stage, instance norm, leaky ReLU.
    """
    # ExperimentPlanner.__init__ defaults (UNet_base_num_features, UNet_max_features_3d,
    # UNet_featuremap_min_edge_length, UNet_blocks_per_stage_encoder/decoder); the planner needs a dataset to exist
    base_features, max_features, min_edge = 32, 320, 4
    blocks_encoder, blocks_decoder = (2,) * 14, (2,) * 13
    _, strides, kernels, new_patch, _ = get_pool_and_conv_props([1.0, 1.0, 1.0], list(patch_size), min_edge, 999999)
    if tuple(int(s) for s in new_patch) != tuple(patch_size):
        raise ValueError(f"nnU-Net would change the patch {patch_size} to {tuple(new_patch)}")
    n_stages = len(strides)
    return {
        "network_class_name": PlainConvUNet.__module__ + "." + PlainConvUNet.__name__,
        "arch_kwargs": {
            "n_stages": n_stages,
            "features_per_stage": [min(max_features, base_features * 2**i) for i in range(n_stages)],
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [list(k) for k in kernels],
            "strides": [list(s) for s in strides],
            "n_conv_per_stage": list(blocks_encoder[:n_stages]),
            "n_conv_per_stage_decoder": list(blocks_decoder[: n_stages - 1]),
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def build_nnunet_unet(patch_size: tuple[int, ...], in_channels: int, deep_supervision: bool) -> nn.Module:
    plan = nnunet_unet_plan(patch_size)
    return get_network_from_plans(plan["network_class_name"], plan["arch_kwargs"], plan["_kw_requires_import"],
                                  in_channels, NUM_CLASSES, allow_init=True, deep_supervision=deep_supervision)


def deep_supervision_scales(patch_size: tuple[int, ...]) -> list[list[float]]:
    """``nnUNetTrainer._get_deep_supervision_scales`` for the U-Net's strides."""
    strides = nnunet_unet_plan(patch_size)["arch_kwargs"]["strides"]
    return [list(s) for s in 1 / np.cumprod(np.vstack(strides), axis=0)][:-1]


def nnunet_loss(n_deep_supervision: int | None) -> nn.Module:
    """``nnUNetTrainer._build_loss`` for labels without regions or ignore label (HECKTOR), DDP off."""
    loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    if n_deep_supervision:
        weights = np.array([1 / (2**i) for i in range(n_deep_supervision)])
        weights[-1] = 0
        loss = DeepSupervisionWrapper(loss, weights / weights.sum())
    return loss


def count_trainable(net: nn.Module) -> tuple[int, int]:
    params = list(net.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


@dataclass
class TrainSetup:
    name: str
    net: nn.Module
    x: torch.Tensor
    target: torch.Tensor | list[torch.Tensor]
    loss: nn.Module
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]
    frozen: list[nn.Parameter]
    scaler: Any = None
    times: list[float] = field(default_factory=list)
    phases: list[tuple[float, ...]] = field(default_factory=list)


def build_train_setup(name: str, preset: dict[str, Any], device: torch.device, amp: torch.dtype | None,
                      seed: int = 0) -> TrainSetup:
    torch.manual_seed(seed)
    model, adaptation, schedule = preset["model"], preset["adaptation"], preset["schedule"]
    patch, batch = tuple(preset["patch_size"]), preset["batch_size"]
    if name == "ct_unetr":
        net, channels = build_unetr(model, 1, NUM_CLASSES, patch), 1
    elif name == "pemma_adaptation":
        net, channels = PEMMAUNETR(model, adaptation, NUM_CLASSES, patch, ("CT", "PET")), 2
        freeze_for_adaptation(net)
    elif name == "pemma_continual":
        net, channels = PEMMAUNETR(model, adaptation, NUM_CLASSES, patch, ("CT",)), 1
        freeze_for_continual(net)
    elif name == "early_fusion":
        net, channels = EarlyFusionUNETR(model, NUM_CLASSES, patch), 2
    elif name == "unet":
        net, channels = build_nnunet_unet(patch, 2, deep_supervision=True), 2
    else:
        raise ValueError(f"unknown training setup {name!r}")
    net = net.to(device).train()
    params = [p for p in net.parameters() if p.requires_grad]
    frozen = [p for p in net.parameters() if not p.requires_grad]
    if name == "unet":  # nnUNetTrainer.configure_optimizers
        optimizer = torch.optim.SGD(params, 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
    else:  # nnunetv2_pemma.training.optim.build_optimizer
        optimizer = torch.optim.AdamW(params, lr=schedule["initial_lr"], weight_decay=schedule["weight_decay"])
    x = torch.randn(batch, channels, *patch, device=device)
    target = torch.randint(0, NUM_CLASSES, (batch, 1, *patch), device=device).float()
    if name == "unet":  # nnU-Net's data loader hands the trainer one target per deep-supervision output
        scales = deep_supervision_scales(patch)
        target = [F.interpolate(target, scale_factor=tuple(s), mode="nearest") for s in scales]
        loss = nnunet_loss(len(scales))
    else:
        loss = nnunet_loss(None)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    return TrainSetup(name, net, x, target, loss, optimizer, params, frozen, scaler)


def autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(s: TrainSetup, device: torch.device, amp: torch.dtype | None) -> tuple[float, tuple[float, ...]]:
    """``nnUNetTrainer.train_step`` without the host-device copies.

    Returns:
        the loss and the seconds spent in (forward + loss, backward, clipping + optimiser step); the device is
        synchronised between the phases.
    """
    sync(device)
    t0 = time.perf_counter()
    s.optimizer.zero_grad(set_to_none=True)
    with autocast(device, amp):
        output = s.net(s.x)
        loss = s.loss(output, s.target)
    sync(device)
    t1 = time.perf_counter()
    (loss if s.scaler is None else s.scaler.scale(loss)).backward()
    sync(device)
    t2 = time.perf_counter()
    if s.scaler is not None:
        s.scaler.unscale_(s.optimizer)
        torch.nn.utils.clip_grad_norm_(s.params, 12)
        s.scaler.step(s.optimizer)
        s.scaler.update()
    else:
        torch.nn.utils.clip_grad_norm_(s.params, 12)
        s.optimizer.step()
    sync(device)
    t3 = time.perf_counter()
    return float(loss.detach()), (t1 - t0, t2 - t1, t3 - t2)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


# --- peak memory ---------------------------------------------------------------------------------------------


def _proc_status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _touch_kernels(device: torch.device) -> None:
    """Run every kind of op a training step uses once on tiny tensors: code pages, oneDNN primitives and thread
    pools then belong to the baseline, not to the first network measured."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.InstanceNorm3d(4, affine=True), nn.LeakyReLU(inplace=True),
                         nn.ConvTranspose3d(4, 4, 2, stride=2), nn.Conv3d(4, 3, 1)).to(device)
    lin = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 24), nn.GELU()).to(device)
    params = list(conv.parameters()) + list(lin.parameters())
    for opt in (torch.optim.AdamW(params), torch.optim.SGD(params, 0.1, momentum=0.9, nesterov=True)):
        y = conv(torch.randn(1, 2, 8, 8, 8, device=device))
        q = lin(torch.randn(1, 1, 4, 8, device=device))
        att = F.scaled_dot_product_attention(q[..., :8], q[..., 8:16], q[..., 16:])
        loss = F.cross_entropy(y, torch.randint(0, 3, (1, 16, 16, 16), device=device)) + att.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 12)
        opt.step()
        opt.zero_grad(set_to_none=True)


def _live_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared parameters count once)."""
    storages = {}
    for t in tensors:
        if torch.is_tensor(t):
            storage = t.untyped_storage()
            storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def _tensor_peak_bytes_cpu(s: TrainSetup, device: torch.device, amp: torch.dtype | None) -> int | None:
    """Peak bytes of CPU tensors during one training step, counted like ``torch.cuda.max_memory_allocated``:
    what lives before the step (weights, buffers, gradients, optimiser state, batch) plus the highest running sum
    of the allocations and frees that ``torch.profiler(profile_memory=True)`` records during the step.

    None when this torch's profiler does not expose its raw memory events.
    """
    from torch.profiler import ProfilerActivity, profile

    live = _live_bytes([*s.net.parameters(), *s.net.buffers(), *(p.grad for p in s.params), s.x,
                        *(s.target if isinstance(s.target, list) else [s.target]),
                        *(v for state in s.optimizer.state.values() for v in state.values())])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(s, device, amp)
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        return None
    events = sorted((e.start_ns(), e.nbytes()) for e in results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return live + peak if events else None


def measure_train_memory(name: str, preset: dict[str, Any], device_type: str, amp_name: str | None, warmup: int,
                         steps: int, threads: int) -> dict[str, Any]:
    """Peak memory of building ``name`` and running ``warmup + steps`` training steps, in bytes.

    On CPU this runs in a fresh process (see the module docstring) and also gives the peak RSS; on CUDA it runs
    in the caller's process.
    """
    torch.set_num_threads(threads)
    device = torch.device(device_type)
    amp = None if amp_name is None else getattr(torch, amp_name)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        sync(device)
        before = torch.cuda.memory_allocated(device)
        s = build_train_setup(name, preset, device, amp)
        for _ in range(warmup):  # optimiser state appears, cudnn.benchmark tries its algorithms
            train_step(s, device, amp)
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)  # the peak restarts from what is allocated now
        for _ in range(steps):
            train_step(s, device, amp)
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del s
        gc.collect()
        torch.cuda.empty_cache()
        return {"peak_bytes": peak, "method": "torch.cuda.max_memory_allocated over the steps after warm-up, minus "
                                              "what was allocated before the network was built"}
    _touch_kernels(device)
    gc.collect()
    reset = _reset_peak_rss()
    before_kib = _proc_status_kib("VmRSS")
    s = build_train_setup(name, preset, device, amp)
    for _ in range(warmup + steps):
        train_step(s, device, amp)
    if reset and before_kib is not None:
        peak_kib, rss_method = _proc_status_kib("VmHWM"), "VmHWM - VmRSS before the build, fresh process"
    else:  # ru_maxrss is KiB on Linux, bytes on macOS
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_kib = maxrss // 1024 if sys.platform == "darwin" else maxrss
        before_kib, rss_method = before_kib or 0, "ru_maxrss - RSS before the build, fresh process"
    rss = (peak_kib - before_kib) * 1024
    tensors = _tensor_peak_bytes_cpu(s, device, amp)  # after the RSS reading: the profiler needs memory too
    if tensors is None:
        return {"peak_bytes": rss, "method": f"peak RSS ({rss_method})", "rss_peak_bytes": rss}
    return {"peak_bytes": tensors, "rss_peak_bytes": rss,
            "method": "tensor bytes: live tensors + profiler-recorded allocation peak of one step (CPU analogue "
                      f"of torch.cuda.max_memory_allocated); RSS: {rss_method}"}


def train_memory(names: list[str], preset: dict[str, Any], device: torch.device, amp: torch.dtype | None,
                 warmup: int, steps: int) -> dict[str, dict[str, Any]]:
    amp_name = None if amp is None else str(amp).removeprefix("torch.")
    args = lambda n: (n, preset, device.type, amp_name, warmup, steps, torch.get_num_threads())  # noqa: E731
    results = {}
    if device.type == "cuda":
        for n in tqdm(names, desc="peak memory", unit="net"):
            results[n] = measure_train_memory(*args(n))
        return results
    ctx = mp.get_context("spawn")
    for n in tqdm(names, desc="peak memory (one process each)", unit="net"):
        with ctx.Pool(1, maxtasksperchild=1) as pool:
            results[n] = pool.apply(measure_train_memory, args(n))
    return results


# --- inference -----------------------------------------------------------------------------------------------


def build_inference_setups(preset: dict[str, Any], device: torch.device) -> dict[str, tuple[nn.Module, int]]:
    """Networks in eval mode with their number of input channels. PEMMA's LoRA B factors are non-zero (as after
    adaptation), so that merging changes the qkv weights."""
    torch.manual_seed(0)
    model, patch = preset["model"], tuple(preset["patch_size"])
    pemma = PEMMAUNETR(model, preset["adaptation"], NUM_CLASSES, patch, ("CT", "PET"))
    with torch.no_grad():
        for name, p in pemma.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    pemma_c = copy.deepcopy(pemma)
    pemma_c.set_input_modalities(("CT",))
    unet = build_nnunet_unet(patch, 2, deep_supervision=False)
    nets = {
        "ct_unetr_C": (build_unetr(model, 1, NUM_CLASSES, patch), 1),
        "pemma_C": (pemma_c, 1),
        "pemma_C_merged": (merge_lora_for_inference(copy.deepcopy(pemma_c)), 1),
        "pemma_CP": (pemma, 2),
        "pemma_CP_merged": (merge_lora_for_inference(copy.deepcopy(pemma)), 2),
        "early_fusion_CP": (EarlyFusionUNETR(model, NUM_CLASSES, patch), 2),
        "unet_CP": (unet, 2),
    }
    for net, _ in nets.values():
        net.to(device).eval().requires_grad_(False)
    return nets


def predict_case(net: nn.Module, volume: torch.Tensor, patch: tuple[int, ...], device: torch.device,
                 amp: torch.dtype | None) -> torch.Tensor:
    with torch.inference_mode(), autocast(device, amp):
        logits = sliding_window_inference(volume, roi_size=patch, sw_batch_size=1, predictor=net, overlap=0.5,
                                          mode="gaussian", sigma_scale=0.125)
        return logits.argmax(1)


# --- files ---------------------------------------------------------------------------------------------------


def checkpoint_bytes(s: TrainSetup, folder: Path) -> int:
    """``torch.save`` of what nnU-Net's ``save_checkpoint`` writes (minus plans and logging)."""
    path = folder / f"{s.name}.pth"
    torch.save({"network_weights": s.net.state_dict(), "optimizer_state": s.optimizer.state_dict(),
                "grad_scaler_state": None if s.scaler is None else s.scaler.state_dict()}, path)
    return path.stat().st_size


def adapter_bytes(net: nn.Module, folder: Path) -> int:
    path = folder / "adapter.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items() if is_adapter_key(k)}, str(path))
    return path.stat().st_size


# --- the run -------------------------------------------------------------------------------------------------


def pick_amp(device: torch.device) -> torch.dtype | None:
    """nnU-Net trains with autocast on CUDA only; bf16 where the GPU has it (no loss scaling), else fp16 with a
    GradScaler."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def machine_info(device: torch.device, amp: torch.dtype | None) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
            "nnunetv2": version("nnunetv2"), "platform": platform.platform(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
            "amp": None if amp is None else str(amp).removeprefix("torch.")}
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def run(preset_name: str, device: torch.device, warmup: int, steps: int, cases: int,
        measure_memory: bool = True) -> dict[str, Any]:
    preset = load_preset(preset_name)
    patch = tuple(preset["patch_size"])
    amp = pick_amp(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as nnUNetTrainer
    result: dict[str, Any] = {"preset": preset["name"], "patch_size": list(patch), "batch_size": preset["batch_size"],
                              "volume": list(VOLUMES.get(preset["name"], (2 * patch[0], 2 * patch[1], 2 * patch[2]))),
                              "warmup_steps": warmup, "steps": steps, "cases": cases,
                              "machine": machine_info(device, amp),
                              "unet_plan": nnunet_unet_plan(patch)["arch_kwargs"]}
    names = list(TRAIN_SETUPS)
    t_start = time.perf_counter()

    # 1. peak memory, each network alone
    if measure_memory:
        result["memory"] = train_memory(names, preset, device, amp, warmup=1, steps=2)

    # 2. step time, interleaved
    setups = {n: build_train_setup(n, preset, device, amp) for n in tqdm(names, desc="building networks")}
    checks: dict[str, Any] = {}
    for n, s in setups.items():
        attn = [m for m in s.net.modules() if type(m).__name__ == "SABlock"]
        checks[n] = {"sdpa_blocks": sum(bool(getattr(m, "use_flash_attention", False)) for m in attn),
                     "attention_blocks": len(attn)}
    order = list(names)
    losses: dict[str, list[float]] = {n: [] for n in names}
    with tqdm(total=(warmup + steps) * len(names), desc="training steps (interleaved)", unit="step") as bar:
        for r in range(warmup + steps):
            for n in order:
                s = setups[n]
                loss, phases = train_step(s, device, amp)
                losses[n].append(loss)
                if r >= warmup:
                    s.times.append(sum(phases))
                    s.phases.append(phases)
                bar.update()
            order = order[1:] + order[:1]  # rotate: no network always runs right after the same one
    for n, s in setups.items():
        total, trainable = count_trainable(s.net)
        checks[n].update({"frozen_params": len(s.frozen),
                          "frozen_params_with_grad": sum(p.grad is not None for p in s.frozen),
                          "frozen_params_with_optimizer_state": sum(p in s.optimizer.state for p in s.frozen),
                          "loss_first_last": [losses[n][0], losses[n][-1]]})
        result.setdefault("train", {})[n] = {
            "label": TRAIN_SETUPS[n], "params": total, "trainable": trainable,
            "step_s_median": statistics.median(s.times), "step_s_min": min(s.times), "step_s_all": s.times,
            **{f"{phase}_s_median": statistics.median(p[i] for p in s.phases)
               for i, phase in enumerate(("forward", "backward", "optimizer"))}}
    result["checks"] = checks

    # 3. files
    with tempfile.TemporaryDirectory() as tmp:
        result["files"] = {"pemma_adapter": adapter_bytes(setups["pemma_adaptation"].net, Path(tmp)),
                           **{f"{n}_checkpoint": checkpoint_bytes(s, Path(tmp)) for n, s in setups.items()}}
    del setups
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 4. inference, interleaved
    nets = build_inference_setups(preset, device)
    torch.manual_seed(1)
    volume = torch.randn(1, 2, *result["volume"], device=device)
    inputs = {n: volume[:, :c] for n, (_, c) in nets.items()}
    times: dict[str, list[float]] = {n: [] for n in nets}
    preds: dict[str, torch.Tensor] = {}
    order = list(nets)
    with tqdm(total=(1 + cases) * len(nets), desc="inference cases (interleaved)", unit="case") as bar:
        for r in range(1 + cases):
            for n in order:
                net, _ = nets[n]
                box = []
                dt = timed(lambda: box.append(predict_case(net, inputs[n], patch, device, amp)), device)
                if r >= 1:
                    times[n].append(dt)
                else:
                    preds[n] = box[0]
                bar.update()
            order = order[1:] + order[:1]
    with torch.inference_mode():  # fp32: the merge itself, not autocast's rounding
        window = volume[..., : patch[0], : patch[1], : patch[2]]
        merge_check = {}
        for m in ("C", "CP"):
            a, b = nets[f"pemma_{m}"][0], nets[f"pemma_{m}_merged"][0]
            x = window[:, : nets[f"pemma_{m}"][1]]
            merge_check[m] = {"max_abs_logit_diff": float((a(x).float() - b(x).float()).abs().max()),
                              "same_labels_fraction": float((preds[f"pemma_{m}"] == preds[f"pemma_{m}_merged"])
                                                            .float().mean())}
    checks["lora_merge"] = merge_check
    checks["lora_layers_left_after_merge"] = sum(isinstance(mod, LoRAQKVLinear)
                                                  for k in ("pemma_C_merged", "pemma_CP_merged")
                                                  for mod in nets[k][0].modules())
    result["inference"] = {n: {"label": INFERENCE_SETUPS[n], "case_s_median": statistics.median(t),
                               "case_s_min": min(t), "case_s_all": t} for n, t in times.items()}
    result["wall_s"] = time.perf_counter() - t_start
    return result


# --- report --------------------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if not a or not b else f"{a / b:.2f}x"


def _mib(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    precision = f"autocast {m['amp']}" if m["amp"] else "fp32"
    device = m.get("gpu", m["cpu"]) + (f" (CUDA {m['cuda']}, {precision})" if "gpu" in m else
                                       f" ({m['cpu_count']} cores, {m['torch_threads']} torch threads, {precision})")
    lines = [
        f"## PEMMA speed and memory: preset `{result['preset']}` on {m['device']}",
        "",
        f"- machine: {device}; {m['platform']}; load average at start {m.get('load_average_at_start', 'n/a')}",
        f"- python {m['python']}, torch {m['torch']}, monai {m['monai']}, nnunetv2 {m['nnunetv2']}",
        f"- patch {'x'.join(map(str, result['patch_size']))}, batch {result['batch_size']}; median of "
        f"{result['steps']} interleaved steps after {result['warmup_steps']} warm-up rounds; inference: median of "
        f"{result['cases']} cases of {'x'.join(map(str, result['volume']))} after one warm-up",
        f"- nnU-Net U-Net: PlainConvUNet, {result['unet_plan']['n_stages']} stages, features "
        f"{result['unet_plan']['features_per_stage']}, 2 input channels, deep supervision in training, SGD",
    ]
    mem = result.get("memory")
    rss = bool(mem) and all("rss_peak_bytes" in v for v in mem.values())
    if mem:
        lines.append(f"- peak memory of a training step, each network alone: {next(iter(mem.values()))['method']}")
    lines += ["", "### Training step", "",
              "| setup | trainable / total params | step (ms) | forward / backward / optimiser (ms) "
              "| vs early fusion | vs nnU-Net U-Net | peak memory (MiB) | vs early fusion | vs nnU-Net U-Net |"
              + (" peak RSS increase (MiB) |" if rss else ""),
              "|---|---|---|---|---|---|---|---|---|" + ("---|" if rss else "")]
    train = result["train"]
    for n, t in train.items():
        step = t["step_s_median"]
        phases = " / ".join(f"{1000 * t[f'{p}_s_median']:,.1f}" for p in ("forward", "backward", "optimizer"))
        row = (f"| {t['label']} | {t['trainable']:,} / {t['params']:,} | {1000 * step:,.1f} | {phases} "
               f"| {_ratio(step, train[EARLY]['step_s_median'])} | {_ratio(step, train[UNET]['step_s_median'])} |")
        if mem:
            p = mem[n]["peak_bytes"]
            row += f" {_mib(p)} | {_ratio(p, mem[EARLY]['peak_bytes'])} | {_ratio(p, mem[UNET]['peak_bytes'])} |"
            if rss:
                row += f" {_mib(mem[n]['rss_peak_bytes'])} |"
        else:
            row += " not measured | | |"
        lines.append(row)
    inf = result["inference"]
    lines += ["", "### Inference per case (sliding window, no mirroring)", "",
              "| setup | time per case (s) | fastest case (s) | vs early fusion (CP) | vs nnU-Net U-Net (CP) |",
              "|---|---|---|---|---|"]
    for n, t in inf.items():
        c = t["case_s_median"]
        lines.append(f"| {t['label']} | {c:.3f} | {t['case_s_min']:.3f} | {_ratio(c, inf[EARLY_INF]['case_s_median'])} "
                     f"| {_ratio(c, inf[UNET_INF]['case_s_median'])} |")
    files = result["files"]
    ef, un = files[f"{EARLY}_checkpoint"], files[f"{UNET}_checkpoint"]
    lines += ["", "### Files", "", "| file | MiB | vs early fusion checkpoint | vs nnU-Net U-Net checkpoint |",
              "|---|---|---|---|",
              f"| PEMMA adapter (safetensors) | {_mib(files['pemma_adapter'])} | "
              f"{_ratio(files['pemma_adapter'], ef)} | {_ratio(files['pemma_adapter'], un)} |"]
    for n in train:
        b = files[f"{n}_checkpoint"]
        lines.append(f"| {train[n]['label']} checkpoint (weights + optimiser state) | {_mib(b)} | "
                     f"{_ratio(b, ef)} | {_ratio(b, un)} |")
    checks = result["checks"]
    lines += ["", "### Checks", ""]
    for n in train:
        c = checks[n]
        lines.append(f"- {train[n]['label']}: {c['frozen_params']} frozen tensors, {c['frozen_params_with_grad']} "
                     f"with a .grad, {c['frozen_params_with_optimizer_state']} with optimiser state; SDPA in "
                     f"{c['sdpa_blocks']}/{c['attention_blocks']} attention blocks; loss "
                     f"{c['loss_first_last'][0]:.3f} -> {c['loss_first_last'][1]:.3f}")
    for mod, c in checks["lora_merge"].items():
        lines.append(f"- LoRA merged into qkv ({mod}): max |logit difference| on one window (fp32) "
                     f"{c['max_abs_logit_diff']:.2e}; same label as unmerged in {100 * c['same_labels_fraction']:.3f}% "
                     f"of the case's voxels")
    lines.append(f"- LoRA layers left after merging: {checks['lora_layers_left_after_merge']}")
    lines.append(f"\nwall time of the measurements: {result['wall_s']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("tiny", "paper"), default=None,
                        help="network size and patch (default: paper on CUDA, tiny on CPU)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--steps", type=int, default=None, help="measured training steps per network "
                        "(default: 10 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default: 3 on CPU, 5 on CUDA)")
    parser.add_argument("--cases", type=int, default=None, help="measured inference cases per network "
                        "(default: 5 on CPU and CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default on CPU: 1, "
                        "see the module docstring; on CUDA: torch's default)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write all numbers as JSON")
    args = parser.parse_args(argv)
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    preset = args.preset or ("paper" if device_type == "cuda" else "tiny")
    d = DEFAULTS[device_type]
    for name in ("steps", "warmup", "cases", "threads"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            parser.error(f"--{name} must be at least {0 if name == 'warmup' else 1}")
    threads = args.threads or d["threads"]
    if threads is not None:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    result = run(preset, torch.device(device_type), warmup=d["warmup"] if args.warmup is None else args.warmup,
                 steps=args.steps or d["steps"], cases=args.cases or d["cases"], measure_memory=not args.no_memory)
    result["total_wall_s"] = time.perf_counter() - started
    print(markdown(result))
    print(f"total wall time (imports excluded): {result['total_wall_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
