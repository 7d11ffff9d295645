"""Accuracy of rank plans on real data: the ratio estimate against the whole-model plan at several windows.

    .venv/bin/python bench/accuracy_plans.py                       # 3 seeds, windows 0.25 and 0.5 (~8 min here)
    .venv/bin/python bench/accuracy_plans.py --seeds 0 --windows 0.5

Per seed: train bench/accuracy.py's ResNet-18 from scratch on scikit-learn's digits (32x32), then compile
it at ratio=0.25 (the 10-way classifier kept, as there) three or more ways: the ratio estimate, and
rank_search="infer" with rank_budget=0.25 at each --windows value (rank_search_window: how far from the
estimate a layer's rank may go). Each model's test accuracy is taken right after compile, after
lrd_fx.bn.recalibrate_bn on 8 batches, and after --finetune-epochs of fine-tuning (all factors trainable).
The search times candidates at the training batch (64) on this machine; a timing cache ($LRD_FX_CACHE)
makes seeds after the first reuse the timings, so every seed gets about the same plan.
Writes bench/results/digits_plans.json (or --out) and prints mean and per-seed figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import lrd_fx  # noqa: E402
from bench.accuracy import RESULTS, accuracy, batches, digits, resnet18, train  # noqa: E402
from lrd_fx.bn import recalibrate_bn  # noqa: E402


def run_seed(seed: int, args) -> dict:
    torch.manual_seed(seed)
    x, y, x_te, y_te = digits(seed)
    model = resnet18()
    pre, _ = train(model, x, y, x_te, y_te, args.pretrain_epochs, 0.05, seed)
    out = {"seed": seed, "original": pre[-1]}
    plans = [("ratio", {})] + [(f"budget, window {w:g}", dict(rank_search="infer", rank_budget=args.ratio,
                                                              rank_search_window=w)) for w in args.windows]
    for name, kw in plans:
        t0 = time.perf_counter()
        gm = lrd_fx.compile(model, (x[:64],), ratio=args.ratio, skip=("fc",), progress=False, **kw)
        compile_s = time.perf_counter() - t0
        row = {"params": sum(p.numel() for p in gm.parameters()), "compile_s": compile_s,
               "decomposed": accuracy(gm, x_te, y_te)}
        gen = torch.Generator().manual_seed(1000 + seed)
        recalibrate_bn(gm, [xb for xb, _ in batches(x, y, 64, gen)], max_batches=8)
        row["recalibrated"] = accuracy(gm, x_te, y_te)
        row["curve"], _ = train(gm, x, y, x_te, y_te, args.finetune_epochs, args.lr, seed)
        row["ranks"] = {n: r["ranks"] for n, r in gm.lrd.plan.items()}
        out[name] = row
        print(f"seed {seed} {name}: {row['params']:,} params, decomposed {row['decomposed']:.2f}%, recalibrated "
              f"{row['recalibrated']:.2f}%, fine-tuned {row['curve'][-1]:.2f}% (compile {compile_s:.0f} s)",
              flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--windows", default="0.25,0.5", help="rank_search_window values of the budget plans")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--pretrain-epochs", type=int, default=12)
    ap.add_argument("--finetune-epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate (cosine)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(RESULTS, "digits_plans.json"))
    args = ap.parse_args(argv)
    args.windows = [float(w) for w in args.windows.split(",") if w.strip()]
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    results = [run_seed(int(s), args) for s in args.seeds.split(",")]
    load1 = os.getloadavg()
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "torch": torch.__version__, "load": [load0[0], load1[0]],
                   "results": results}, f, indent=1)
    from tabulate import tabulate
    names = [k for k in results[0] if isinstance(results[0][k], dict)]

    def figure(row: dict, key: str) -> float:
        return row["curve"][-1] if key == "fine-tuned" else row[key]

    rows = []
    for n in names:
        rs = [r[n] for r in results]
        cells = [f"{statistics.mean(figure(v, k) for v in rs):.2f} ({' / '.join(f'{figure(v, k):.2f}' for v in rs)})"
                 for k in ("decomposed", "recalibrated", "fine-tuned")]
        rows.append([n, f"{rs[0]['params']:,}"] + cells)
    original = statistics.mean(r["original"] for r in results)
    print(f"digits, ResNet-18 from scratch {args.pretrain_epochs} epochs, ratio {args.ratio} (fc kept), fine-tuned "
          f"{args.finetune_epochs} epochs; seeds {args.seeds}; torch {torch.__version__}, {args.threads} threads, "
          f"load {load0[0]:.1f} -> {load1[0]:.1f}")
    print(f"original (trained from scratch): {original:.2f}% test accuracy (mean over seeds)")
    print(tabulate(rows, headers=["plan", "params", "decomposed %", "recalibrated %", "fine-tuned %"]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
