"""Step time of one conv layer's factor chain over a rank range (the paper's Fig. 2): CSV + PNG.

    python bench/rank_sweep.py                                  # 512->r->r->512 3x3, 14x14, batch 8
    python bench/rank_sweep.py --batch 32 --ranks 64:320:1      # the paper's setting, every rank (slow)
    python bench/rank_sweep.py --mode train --out /tmp/sweep

All ranks are timed interleaved (round-robin, median per rank), so drift hits every rank alike.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lrd_fx.cost import model as cm  # noqa: E402
from lrd_fx.cost.timer import layer_step, measure_interleaved  # noqa: E402
from lrd_fx.factorize import chain_like, chain_params  # noqa: E402


def parse_ranks(text: str) -> list[int]:
    """"96:300:8,120:136" -> ranks 96, 104, ... 296 and every rank 120..135 (stop exclusive)."""
    out: set[int] = set()
    for part in text.split(","):
        bits = [int(b) for b in part.split(":")]
        if len(bits) == 1:
            out.add(bits[0])
        else:
            out.update(range(bits[0], bits[1], bits[2] if len(bits) > 2 else 1))
    return sorted(r for r in out if r >= 1)


def chain_flops(cin: int, cout: int, k: int, r_in: int, r_out: int, positions: int, scheme: str) -> int:
    if scheme == "tucker2":
        return 2 * positions * (cin * r_in + r_in * r_out * k * k + r_out * cout)
    return 2 * positions * (cin * k * k * r_in + r_in * cout)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cin", type=int, default=512)
    p.add_argument("--cout", type=int, default=512)
    p.add_argument("--kernel", type=int, default=3)
    p.add_argument("--hw", type=int, default=14, help="input height = width")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ranks", default="96:300:8,120:136,248:264",
                   help="comma-separated start:stop[:step] ranges (stop exclusive)")
    p.add_argument("--scheme", choices=["tucker2", "svd"], default="tucker2",
                   help="tucker2: 1x1 cin->r, kxk r->r, 1x1 r->cout; svd: kxk cin->r, 1x1 r->cout")
    p.add_argument("--mode", choices=["infer", "train"], default="infer")
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds (median per rank)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="bench/results/rank_sweep", help="path prefix of the .csv and .png")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ranks = parse_ranks(args.ranks)
    full = min(args.cin, args.cout) if args.scheme == "tucker2" else min(args.cout, args.cin * args.kernel ** 2)
    ranks = [r for r in ranks if r <= full]
    dev = torch.device(args.device)
    conv = nn.Conv2d(args.cin, args.cout, args.kernel, padding=args.kernel // 2).to(dev)
    shape = (args.batch, args.cin, args.hw, args.hw)
    positions = args.batch * args.hw * args.hw

    def ranks_of(r):
        return (r, r) if args.scheme == "tucker2" else (r,)

    steps = {r: layer_step(chain_like(conv, ranks_of(r), args.scheme), shape, torch.float32, dev, args.mode)
             for r in ranks}
    steps["original"] = layer_step(conv, shape, torch.float32, dev, args.mode)
    print(f"{args.scheme} chain {args.cin}->r->{'r->' if args.scheme == 'tucker2' else ''}{args.cout}, "
          f"{args.kernel}x{args.kernel}, input {'x'.join(map(str, shape))}, mode {args.mode}, "
          f"{len(ranks)} ranks, {args.repeats} interleaved rounds, {torch.get_num_threads()} threads, "
          f"device {dev}", flush=True)
    t0 = time.perf_counter()
    res = measure_interleaved(steps, device=dev, rounds=args.repeats, warmup=1, min_time_s=0.02)
    wall = time.perf_counter() - t0
    orig = res.pop("original")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    csv_path, png_path = args.out + ".csv", args.out + ".png"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "median_ms", "iqr_ms", "n", "params", "gflops", "speedup_vs_original"])
        w.writerow(["original", f"{orig.median_s * 1e3:.4f}", f"{orig.iqr_s * 1e3:.4f}", orig.n,
                    sum(p.numel() for p in conv.parameters()),
                    f"{2 * positions * args.cin * args.cout * args.kernel ** 2 / 1e9:.3f}", "1.000"])
        for r in ranks:
            m = res[r]
            w.writerow([r, f"{m.median_s * 1e3:.4f}", f"{m.iqr_s * 1e3:.4f}", m.n,
                        chain_params(conv, ranks_of(r), args.scheme),
                        f"{chain_flops(args.cin, args.cout, args.kernel, r, r, positions, args.scheme) / 1e9:.3f}",
                        f"{orig.median_s / m.median_s:.3f}"])

    times = {r: res[r].median_s for r in ranks}
    noise = cm.estimate_noise(res)
    edges = cm.find_edges(times, max(cm.EDGE_THRESHOLD, 2 * noise))
    print(f"measured in {wall:.0f} s; original layer {orig.median_s * 1e3:.2f} ms; "
          f"median relative noise of one median {noise:.1%}")
    for a, b, j in edges:
        print(f"  step edge {a} -> {b}: {times[a] * 1e3:.2f} -> {times[b] * 1e3:.2f} ms (+{j:.1%})")
    if not edges:
        print("  no step edge above the noise threshold")

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"wrote {csv_path} (matplotlib missing: no plot)")
        return 0
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.errorbar(ranks, [res[r].median_s * 1e3 for r in ranks], yerr=[res[r].iqr_s * 1e3 / 2 for r in ranks],
                fmt=".-", lw=1, ms=4, capsize=1.5, label="factor chain (median, IQR/2)")
    ax.axhline(orig.median_s * 1e3, color="gray", ls="--", lw=1, label="original layer")
    for a, b, j in edges:
        ax.axvline(a + 0.5, color="red", alpha=0.3, lw=1)
        ax.annotate(f"{a}->{b}\n+{j:.0%}", (a + 0.5, times[b] * 1e3), fontsize=7, color="red",
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("rank r")
    ax.set_ylabel(f"{args.mode} step time (ms)")
    ax.set_title(f"{args.scheme}: {args.cin}->r->{'r->' if args.scheme == 'tucker2' else ''}{args.cout} "
                 f"{args.kernel}x{args.kernel}, {'x'.join(map(str, shape))}, {dev}, "
                 f"{torch.get_num_threads()} threads")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    print(f"wrote {csv_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
