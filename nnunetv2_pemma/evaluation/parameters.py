"""Trainable and total parameters of each adaptation method at a preset's size (CPU, no forward pass), and the
size of a PEMMA adapter file next to a full nnU-Net checkpoint of the same network (`pemma parameters`)."""

from __future__ import annotations

import dataclasses
import io
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from nnunetv2_pemma.adaptation.methods import is_added, qkv_methods, train_only
from nnunetv2_pemma.config import MODALITIES, Adaptation, PemmaBlock
from nnunetv2_pemma.errors import PlansError
from nnunetv2_pemma.networks.build import build_early_fusion, build_pemma_network, build_plain_network
from nnunetv2_pemma.networks.modality_slots import count_parameters
from nnunetv2_pemma.plans import load_preset

NUM_CLASSES = 3  # background, GTVp, GTVn


def _checkpoint_bytes(network: torch.nn.Module) -> int:
    """Bytes of an nnU-Net-style checkpoint: weights plus AdamW state (two moments) for the trainable ones."""
    trainable = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable)
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    buffer = io.BytesIO()
    torch.save({"network_weights": network.state_dict(), "optimizer_state": optimizer.state_dict()}, buffer)
    return buffer.getbuffer().nbytes


def _method_rows(block: PemmaBlock, patch: tuple[int, ...]) -> list[dict]:
    """PEMMA with each adaptation method other than the preset's (at the preset's rank), adaptation stage; a
    centre-routed mixture with one expert (each further centre adds one LoRA's worth)."""
    rows = []
    for name in qkv_methods():
        if name == block.adaptation.method:
            continue
        options = {"method": name}
        if name == "moa" and block.adaptation.moa_routing == "center" and not block.adaptation.moa_experts:
            options["moa_experts"] = ("CENTRE",)
        try:
            net = build_pemma_network(dataclasses.replace(
                block, adaptation=dataclasses.replace(block.adaptation, **options)), NUM_CLASSES, patch)
        except PlansError:  # a method the backbone does not support (prior tokens on SwinUNETR)
            continue
        train_only(net, "adaptation")
        total, trainable = count_parameters(net)
        rows.append({"method": f"PEMMA ({_describe(net.adaptation)})", "trainable": trainable, "total": total,
                     "paper": ""})
    return rows


def _describe(adaptation: Adaptation) -> str:
    text = f"{adaptation.method}, r={adaptation.lora_rank}"
    if adaptation.method == "prior":
        return f"{text}, {adaptation.prior_tokens} prior tokens per modality and state, entry {adaptation.prior_entry}"
    if adaptation.method == "moa":
        layer = adaptation.moa_routing
        experts = (len(adaptation.moa_experts) if layer == "center" else 3 if layer == "modality"
                   else adaptation.moa_gate_experts)
        return f"{text}, {experts} expert{'s' if experts > 1 else ''}, {layer} routing"
    return text


def measure(preset_name: str) -> list[dict]:
    """One row per method (CT base, early fusion when the backbone has it, late fusion, PEMMA with each other
    adaptation method, PEMMA as the preset says); the last is the preset's PEMMA."""
    preset = load_preset(preset_name)
    block, patch = preset.block(MODALITIES), preset.patch_size
    architecture = preset.model.architecture
    phi, _ = count_parameters(build_plain_network(block, 1, NUM_CLASSES, patch))
    pemma = build_pemma_network(block, NUM_CLASSES, patch)
    train_only(pemma, "adaptation")
    pemma_total, pemma_trainable = count_parameters(pemma)
    rows = [{"method": f"CT {architecture} (base, Phi)", "trainable": phi, "total": phi, "paper": "Phi = 92.58M"}]
    try:
        early_total, _ = count_parameters(build_early_fusion(block, NUM_CLASSES, patch))
        rows.append({"method": "Early fusion", "trainable": early_total, "total": early_total,
                     "paper": "1.0043 x Phi"})
    except PlansError:  # early fusion exists for UNETR only
        pass
    rows += [
        {"method": f"Late fusion (CT + PET {architecture})", "trainable": phi, "total": 2 * phi, "paper": "2 x Phi"},
        *_method_rows(block, patch),
        {"method": f"PEMMA ({_describe(preset.adaptation)})",
         "trainable": pemma_trainable, "total": pemma_total, "paper": "0.08 x Phi"},
    ]
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "adapter.safetensors"
        save_file({k: v.contiguous() for k, v in pemma.state_dict().items() if is_added(k)}, str(adapter))
        rows[-1]["adapter_bytes"] = adapter.stat().st_size
        rows[-1]["checkpoint_bytes"] = _checkpoint_bytes(pemma)
    for r in rows:
        r["trainable_over_phi"] = r["trainable"] / phi
    return rows


def measure_trained(pemma: torch.nn.Module) -> list[dict]:
    """`measure`'s rows for a PEMMA network whose backbone comes from nnU-Net's plans (nnU-Net's U-Net, built by
    its trainer from a trained model's plans.json): the CT base, early fusion (the base's first kernel widened by
    one channel), late fusion and PEMMA."""
    train_only(pemma, "adaptation")
    total, trainable = count_parameters(pemma)
    base = {n: p for n, p in pemma.named_parameters() if not is_added(n)}
    phi = sum(p.numel() for p in base.values())
    first_kernel = next(p for p in base.values() if p.ndim >= 4)
    description = _describe(pemma.adaptation) + (", norm shifts" if pemma.adaptation.train_norms else "")
    rows = [{"method": f"CT {pemma.backbone_name} (base, Phi)", "trainable": phi, "total": phi, "paper": ""},
            {"method": "Early fusion", "trainable": phi + first_kernel.numel(), "total": phi + first_kernel.numel(),
             "paper": ""},
            {"method": f"Late fusion (CT + PET {pemma.backbone_name})", "trainable": phi, "total": 2 * phi,
             "paper": ""},
            {"method": f"PEMMA ({description}, PET slot)", "trainable": trainable, "total": total, "paper": ""}]
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "adapter.safetensors"
        save_file({k: v.detach().clone().contiguous() for k, v in pemma.state_dict().items() if is_added(k)},
                  str(adapter))
        rows[-1]["adapter_bytes"] = adapter.stat().st_size
        rows[-1]["checkpoint_bytes"] = _checkpoint_bytes(pemma)
    for r in rows:
        r["trainable_over_phi"] = r["trainable"] / phi
    return rows


def format_parameter_table(rows: list[dict]) -> str:
    lines = ["| method | trainable | total | trainable / Phi | paper |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['trainable']:,} | {r['total']:,} | {r['trainable_over_phi']:.4f} | {r['paper']} |"
              for r in rows]
    p = rows[-1]
    lines.append(f"\nPEMMA adapter file {p['adapter_bytes'] / 2**20:.1f} MiB vs full checkpoint (weights + AdamW "
                 f"state) {p['checkpoint_bytes'] / 2**20:.1f} MiB: ratio {p['adapter_bytes'] / p['checkpoint_bytes']:.4f}")
    return "\n".join(lines)
