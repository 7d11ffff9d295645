"""DistributedDataParallel with freezing gates: 2 gloo processes on CPU, sequential schedule."""
import datetime
import os
import time
import warnings

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


def _worker(rank: int) -> dict:
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
    return {"state": {k: v.clone() for k, v in gm.state_dict().items()},
            "params": [n for n, _ in gm.named_parameters()], "frozen": report}


def _process(rank: int, work, init_file: str, out_dir: str) -> None:
    """One of the two gloo processes: work(rank)'s result is written (whole, then renamed) before a barrier
    and the group's teardown, so a result on disk from each process means both finished their work."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        result = work(rank)
        path = os.path.join(out_dir, f"rank{rank}.pt")
        torch.save(result, path + ".part")
        os.replace(path + ".part", path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn_two(work, tmp_path, what: str = "DDP workers", timeout_s: float = 240):
    """Run work(rank) in 2 gloo processes; return what each returned.

    torch's gloo teardown (destroy_process_group, then the process's exit) has been seen to abort a
    process ("terminate called without an active exception") after both had written their results. Such a
    death after both results are on disk is torch's shutdown, not the work's: the results stand, and the
    test's assertions judge them. A process that dies before its result is written fails the test."""
    results = [tmp_path / f"rank{r}.pt" for r in range(2)]
    ctx = mp.spawn(_process, args=(work, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"{what} hung (no result after {timeout_s:.0f} s)")
    except mp.ProcessExitedException as e:
        if e.signal_name is None or not all(p.exists() for p in results):
            raise
        warnings.warn(f"{what}: {e} after both processes wrote their results (gloo teardown)")
    return tuple(torch.load(p) for p in results)


def _aborts_at_exit(rank: int) -> dict:
    import atexit
    if rank == 0:
        atexit.register(os.abort)        # as gloo's teardown has done: after the work, at the process's exit
    return {"rank": rank}


def _aborts_in_work(rank: int) -> dict:
    if rank == 0:
        os.abort()
    dist.barrier()                     # process 1 waits for process 0, which never comes
    return {"rank": rank}


def test_a_process_dying_after_its_result_is_torchs_teardown_and_before_it_a_failure(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.warns(UserWarning, match="SIGABRT after both processes wrote their results"):
        assert spawn_two(_aborts_at_exit, tmp_path / "a", timeout_s=60) == ({"rank": 0}, {"rank": 1})
    with pytest.raises(mp.ProcessExitedException, match="SIGABRT"):
        spawn_two(_aborts_in_work, tmp_path / "b", timeout_s=60)


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
    assert r0["state"]["lrd_freezer.current_epoch"].item() == EPOCHS     # the next epoch to run
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
