"""DDP + sequential freezing: `torchrun --nproc_per_node=2 examples/ddp_sequential_freeze.py` (CPU, gloo).

Each process compiles the same decomposed model with freeze="sequential", wraps it with
lrd_fx.wrap_ddp (DistributedDataParallel with find_unused_parameters=True: frozen factors get no
gradient), and drives the gates with `for epoch in freezer.epochs(n)` on every process.
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision

import lrd_fx
from lrd_fx import wrap_ddp


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5, help="steps per epoch")
    ap.add_argument("--batch", type=int, default=16, help="per-process batch size")
    ap.add_argument("--ckpt", default=None, help="save/resume a checkpoint at this path")
    args = ap.parse_args()

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))

    torch.manual_seed(0)                                   # same initial weights on every process
    model = torchvision.models.resnet18(num_classes=10).to(device)
    x0 = torch.randn(2, 3, 32, 32, device=device)
    gm = lrd_fx.compile(model, (x0,), ratio=0.25, freeze="sequential", progress=rank == 0)
    freezer = gm.lrd.freezer
    if args.ckpt and os.path.exists(args.ckpt):
        gm.load_state_dict(torch.load(args.ckpt, map_location=device))   # restores the epoch counter too
    ddp = wrap_ddp(gm, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    gen = torch.Generator().manual_seed(1000 + rank)      # each process sees different (random) data
    for epoch in freezer.epochs(args.epochs):
        total = 0.0
        for _ in range(args.steps):
            x = torch.randn(args.batch, 3, 32, 32, generator=gen).to(device)
            y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
            opt.zero_grad()                                # set_to_none (the default) keeps frozen grads None
            loss = nn.functional.cross_entropy(ddp(x), y)
            loss.backward()
            opt.step()
            total += loss.item()
        if rank == 0:
            print(f"epoch {epoch}: phase {freezer.phase}, {len(freezer.trainable_now())} trainable / "
                  f"{len(freezer.frozen_now())} frozen factor layers, loss {total / args.steps:.3f}", flush=True)

    # parameters must agree on every process
    flat = torch.cat([p.detach().reshape(-1) for p in gm.parameters()])
    copies = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(copies, flat)
    if rank == 0:
        same = all(torch.equal(copies[0], c) for c in copies[1:])
        print(f"parameters identical on all {world} processes: {same}")
        if args.ckpt:
            torch.save(gm.state_dict(), args.ckpt)         # epochs() ran to its end: the counter names the next epoch
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
