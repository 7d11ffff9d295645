"""DistributedDataParallel with freezing gates: 2 gloo processes on CPU, sequential schedule."""
import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import lrd_fx
from lrd_fx import wrap_ddp
from lrd_fx.errors import FreezeError

EPOCHS = 4
STEPS = 3


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        x0 = torch.randn(2, 4, 6, 6)
        gm = lrd_fx.compile(_model(), (x0,), ratio=0.5, freeze="sequential", min_channels=1)
        fr = gm.lrd.freezer
        ddp = wrap_ddp(gm)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        gen = torch.Generator().manual_seed(100 + rank)       # different data on each process
        report = []
        for epoch in fr.epochs(EPOCHS):
            frozen = fr.frozen_now()
            params = dict(gm.named_parameters())
            before = {n: p.detach().clone() for n, p in params.items()}
            for _ in range(STEPS):
                x = torch.randn(8, 4, 6, 6, generator=gen)
                y = torch.randint(0, 5, (8,), generator=gen)
                opt.zero_grad()
                nn.functional.cross_entropy(ddp(x), y).backward()
                opt.step()
            for n, p in params.items():
                owner = n.rpartition(".")[0]
                if owner in frozen:
                    report.append((epoch, n, p.grad is None, torch.equal(p, before[n])))
        torch.save({"state": {k: v.clone() for k, v in gm.state_dict().items()},
                    "params": [n for n, _ in gm.named_parameters()], "frozen": report},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn_two(worker, tmp_path, what: str = "DDP workers", timeout_s: float = 240):
    """Run worker(rank, 2, init_file, out_dir) in 2 gloo processes; return what each saved to rank<r>.pt."""
    ctx = mp.spawn(worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{what} hung (no result after {timeout_s:.0f} s)")
    return torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")


def test_ddp_two_processes_sequential_freezing(tmp_path):
    r0, r1 = spawn_two(_worker, tmp_path)
    # every frozen factor had no gradient and did not move, in every epoch, on both processes
    for rep in (r0["frozen"], r1["frozen"]):
        assert {e for e, *_ in rep} == set(range(EPOCHS))
        assert {n for e, n, *_ in rep if e == 0} == {"0.core.weight", "3.last.weight", "3.last.bias",
                                                      "7.last.weight", "7.last.bias"}
        assert all(grad_none and same for _, _, grad_none, same in rep), rep
    # parameters are identical across processes (BatchNorm running stats are not: DDP broadcasts
    # buffers before each forward, and the last forward updates each process's own copy)
    assert r0["state"].keys() == r1["state"].keys() and len(r0["params"]) == 12
    for k in r0["params"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert r0["state"]["lrd_freezer.current_epoch"].item() == EPOCHS - 1
    # and training did change the model
    ref = lrd_fx.compile(_model(), (torch.randn(2, 4, 6, 6),), ratio=0.5, freeze="sequential",
                         min_channels=1).state_dict()
    assert not torch.equal(ref["0.core.weight"], r0["state"]["0.core.weight"])


def test_wrap_ddp_refuses_settings_that_break_with_gates():
    gm = lrd_fx.compile(_model(), (torch.randn(2, 4, 6, 6),), ratio=0.5, freeze="sequential", min_channels=1)
    with pytest.raises(FreezeError, match="find_unused_parameters=True"):
        wrap_ddp(gm, find_unused_parameters=False)
    with pytest.raises(FreezeError, match="static_graph"):
        wrap_ddp(gm, static_graph=True)
