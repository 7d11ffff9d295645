"""Training throughput: original vs decomposed vs decomposed+static vs decomposed+sequential freezing.

    .venv/bin/python bench/train_throughput.py                       # ResNet-50 and ViT-S, batch 8, 224 px
    .venv/bin/python bench/train_throughput.py --models resnet50 --res 160 --threads 2
    .venv/bin/python bench/train_throughput.py --rank-search train   # adds searched(+sequential) variants

One training step = zero_grad + forward + cross-entropy backward + SGD(momentum, weight decay) step on
a fixed random batch, in train mode. All variants of a model are timed interleaved (one block of each
per round, order rotated; lrd_fx.cost.timer.measure_interleaved) so drift on a shared machine hits
them alike; each figure is the median over the rounds. The sequential schedule's two states are timed
as separate candidates in the same rounds and averaged (what a run of alternating epochs costs).
All decomposed variants share one decomposition: "decomposed" is strip_gates() of the gated model,
"static" is a copy with the static schedule (freeze_group="core": the phase-0 state kept forever).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import lrd_fx  # noqa: E402
from lrd_fx.api import copy_model  # noqa: E402
from lrd_fx.freezing import StaticSchedule, find_freezer  # noqa: E402
from lrd_fx.passes.gates import strip_gates  # noqa: E402

from lrd_fx.cost.timer import measure_interleaved  # noqa: E402


def build(name: str, res: int, num_classes: int) -> nn.Module:
    if name == "resnet50":
        import torchvision
        return torchvision.models.resnet50(num_classes=num_classes)
    if name in ("vit_small", "vit_s"):
        import timm
        return timm.create_model("vit_small_patch16_224", pretrained=False, img_size=res,
                                 num_classes=num_classes)
    import timm
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


def sgd(model: nn.Module):
    return torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4)


def train_step(model: nn.Module, x, y, before=None, opt=None):
    opt = opt or sgd(model)
    model.train()

    def step():
        if before is not None:
            before()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def bench_model(name: str, args) -> list[list]:
    torch.manual_seed(0)
    model = build(name, args.res, args.classes)
    x = torch.randn(args.batch, 3, args.res, args.res)
    y = torch.randint(0, args.classes, (args.batch,))
    t0 = time.perf_counter()
    gated = lrd_fx.compile(model, (x[:1],), ratio=args.ratio, freeze="sequential", progress=False)
    t_compile = time.perf_counter() - t0
    decomposed = strip_gates(gated)
    static = copy_model(gated)
    find_freezer(static).set_schedule(StaticSchedule("core"))
    fr = gated.lrd.freezer
    states = fr.state_epochs()                       # [0, period]: one epoch per schedule state
    fns = {"original": train_step(model, x, y), "decomposed": train_step(decomposed, x, y),
           "decomposed+static": train_step(static, x, y)}
    opt = sgd(gated)   # one optimizer across the states, as in a real run
    for e in states:
        fns[f"decomposed+sequential@{e}"] = train_step(gated, x, y, before=lambda e=e: fr.set_epoch(e), opt=opt)
    sizes = {"original": params(model), "decomposed": params(decomposed)}
    frozen_frac = {}
    for e in states:
        fr.set_epoch(e)
        frozen_frac[e] = len(fr.frozen_now()) / max(1, len(fr.factors))
    notes = [f"{name}: compile {t_compile:.0f} s; {len(fr.factors)} factor layers; "
             f"sequential states (epochs {states}) freeze {[f'{v:.0%}' for v in frozen_frac.values()]} of them"]
    if args.rank_search == "train":
        try:
            t0 = time.perf_counter()
            # the search times layers at the bench's batch size, so example inputs are the full batch
            searched = lrd_fx.compile(model, (x,), ratio=args.ratio, rank_search="train",
                                      rank_search_budget_s=args.search_budget_s,
                                      freeze="sequential", progress=False)
            notes.append(f"{name}: rank_search='train' compile {time.perf_counter() - t0:.0f} s")
            sfr = searched.lrd.freezer
            fns["searched"] = train_step(strip_gates(searched), x, y)
            sopt = sgd(searched)
            for e in sfr.state_epochs():
                fns[f"searched+sequential@{e}"] = train_step(searched, x, y, before=lambda e=e: sfr.set_epoch(e),
                                                             opt=sopt)
            sizes["searched"] = params(searched)
        except (lrd_fx.LRDError, ImportError) as e:
            notes.append(f"{name}: rank_search='train' unavailable: {type(e).__name__}: {e}")
    res = measure_interleaved(fns, rounds=args.rounds, warmup=args.warmup, min_time_s=0.0)
    t = {k: m.median_s for k, m in res.items()}
    for prefix in ("decomposed+sequential", "searched+sequential"):
        keys = [k for k in t if k.startswith(prefix + "@")]
        if keys:
            t[prefix] = statistics.mean(t[k] for k in keys)
    order = ["original", "decomposed", "decomposed+static", "decomposed+sequential"]
    order += [k for k in t if k.startswith("decomposed+sequential@")]
    order += [k for k in ("searched", "searched+sequential") if k in t]
    order += [k for k in t if k.startswith("searched+sequential@")]
    rows = []
    for k in order:
        base = k.split("@")[0].split("+")[0]
        rows.append([name, k + (" (state)" if "@" in k else ""), sizes.get(base, sizes["decomposed"]),
                     f"{t[k] * 1e3:.0f}", f"{args.batch / t[k]:.2f}",
                     f"{t['original'] / t[k]:.2f}x", f"{t['decomposed'] / t[k]:.2f}x"])
    return rows, notes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,vit_small", help="comma list: resnet50, vit_small, or a timm name")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--res", type=int, default=224, help="input resolution (square)")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--rounds", type=int, default=11, help="interleaved timed rounds (median taken)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (default 1: on a shared 2-core machine 2 threads stall on each "
                         "other's load and time 3-4x slower with +-50%% noise)")
    ap.add_argument("--rank-search", choices=["none", "train"], default="none",
                    help="also time rank_search='train' (+sequential) variants")
    ap.add_argument("--search-budget-s", type=float, default=300.0,
                    help="rank_search_budget_s per model for --rank-search train (layers past it keep the estimate)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from tabulate import tabulate
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    all_rows, all_notes = [], []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        rows, notes = bench_model(name, args)
        all_rows += rows
        all_notes += notes
    load1 = os.getloadavg()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; batch {args.batch}, {args.res}x{args.res}, ratio {args.ratio}; "
          f"{args.rounds} interleaved rounds (median); load average {load0[0]:.1f} -> {load1[0]:.1f} "
          f"(shared machine: absolute numbers are noisy, ratios are paired)")
    print(tabulate(all_rows, headers=["model", "variant", "params", "ms/step", "samples/s",
                                      "vs original", "vs decomposed"], tablefmt="github"))
    print("decomposed+sequential = mean step time over the schedule's states (rows marked 'state').")
    for n in all_notes:
        print("note:", n)
    print(f"total bench time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
