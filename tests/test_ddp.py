"""PEMMA under DistributedDataParallel: frozen base, CT-only input in "drop" mode (PET modules get no gradient)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from networks_helpers import CLASSES, Tiny
from nnunetv2_pemma.adaptation.methods import train_only

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _all_ranks_equal(t: torch.Tensor) -> bool:
    gathered = [torch.empty_like(t) for _ in range(WORLD_SIZE)]
    dist.all_gather(gathered, t)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.manual_seed(rank)  # different initial PEMMA parameters: DDP must broadcast rank 0's
        tiny = Tiny.of("UNETR")
        net = tiny.adapted(tiny.base(), ["CT"], missing_modality="drop")
        train_only(net, "adaptation")
        ddp = DistributedDataParallel(net, find_unused_parameters=True)
        start = {k: v.clone() for k, v in net.state_dict().items()}
        optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(2):
            x = tiny.image(1, batch=1)  # each rank its own data
            target = torch.randint(0, CLASSES, (1, *tiny.img))
            optimizer.zero_grad()
            nn.functional.cross_entropy(ddp(x), target).backward()
            optimizer.step()

        for name, value in net.state_dict().items():
            assert _all_ranks_equal(value), f"{name} differs across ranks"
        changed = {k for k, v in net.state_dict().items() if not torch.equal(v, start[k])}
        assert changed and all("lora_" in k for k in changed), changed  # PET unused, base frozen
    finally:
        dist.destroy_process_group()


def test_ddp_adaptation_step_with_unused_pet_modules_stays_in_sync():
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD_SIZE, join=True)
