"""Does the rank search pay off? Searched vs un-searched model at the same ratio, in one run.

    python bench/rank_search.py                         # ResNet-50, ratio 0.25, "infer", batch 1, 224x224
    python bench/rank_search.py --mode train --batch 8  # search and time forward+backward
    python bench/rank_search.py --model vit_small_patch16_224 --rounds 21

Steps, all in this process and on this device:
  1. compile at --ratio without search ("lrd"), then with rank_search=--mode and a fresh timing cache
     (cold: every timing measured), then again (warm: everything from the cache) - compile wall times;
  2. check the warm compile measured nothing and built the same architecture;
  3. parameters of the searched model vs the un-searched one (the search may trade a little rank for
     speed, or give rank back where the original layer wins);
  4. original, lrd and lrd+search timed interleaved round-robin (--rounds blocks each, same batch as the
     search); speed-ups are medians of the per-round ratios (paired), with their IQR;
  5. the searched model's per-layer report (estimate, chosen rank, measured times, decision).
Results go to <out>.json next to the printed tables.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lrd_fx  # noqa: E402
from lrd_fx.cost.timer import layer_step, measure_rounds, summarize  # noqa: E402
from lrd_fx.models import create_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def _plan_key(gm) -> dict:
    return {n: (r.decision, tuple(r.ranks) if r.ranks else None) for n, r in gm.lrd.records().items()}


def _paired(samples: dict, base: str, other: str) -> tuple[float, float]:
    """Median and IQR of per-round speed-ups base_time / other_time."""
    m = summarize([b / o for b, o in zip(samples[base], samples[other])])
    return m.median_s, m.iqr_s


def machine() -> str:
    from bench.harness import machine_info, machine_line
    return machine_line(machine_info("cpu" if not torch.cuda.is_available() else "cuda"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50", help="torchvision or timm model name (random weights)")
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--mode", choices=["infer", "train"], default="infer")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds of the whole models")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--cache", default=None,
                   help="timing-cache file (default: a fresh temporary file, so the cold compile measures)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/rank_search-<model>-<mode>.json)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(args.model).eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    tmp = None
    if args.cache is None:
        tmp = tempfile.TemporaryDirectory(prefix="lrd_fx-rank-search-")
        args.cache = os.path.join(tmp.name, "timings.sqlite")
    common = dict(ratio=args.ratio, progress=not args.no_progress)
    search = dict(common, rank_search=args.mode, cache=args.cache)
    load0 = os.getloadavg()[0]

    t = time.perf_counter()
    lrd = lrd_fx.compile(model, (x,), **common)
    t_lrd = time.perf_counter() - t
    t = time.perf_counter()
    cold = lrd_fx.compile(model, (x,), **search)
    t_cold = time.perf_counter() - t
    t = time.perf_counter()
    warm = lrd_fx.compile(model, (x,), **dict(search, progress=False))
    t_warm = time.perf_counter() - t
    search_note = next((n for n in cold.lrd.notes if n.startswith("rank search")), "")
    warm_note = next((n for n in warm.lrd.notes if n.startswith("rank search")), "")
    same_arch = _plan_key(cold) == _plan_key(warm)

    n_orig, n_lrd, n_search = _params(model), _params(lrd), _params(cold)
    variants = {"original": model, "lrd": lrd, "lrd+search": cold}
    fns = {k: layer_step(m, tuple(x.shape), mode=args.mode) for k, m in variants.items()}
    samples = measure_rounds(fns, rounds=args.rounds, warmup=1, min_time_s=0.2)
    med = {k: statistics.median(v) for k, v in samples.items()}
    sp = {k: _paired(samples, "original", k) for k in variants}
    s_vs_lrd = _paired(samples, "lrd", "lrd+search")
    load1 = os.getloadavg()[0]

    from tabulate import tabulate
    machine_text = machine()
    print(machine_text)
    print(f"{args.model}, ratio {args.ratio}, rank_search={args.mode!r}, input {list(x.shape)}, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds; load average "
          f"{load0:.2f} -> {load1:.2f}")
    rows = []
    for k in variants:
        m, iqr = sp[k]
        rows.append([k, f"{_params(variants[k]):,}", f"{med[k] * 1e3:.1f}", f"{m:.3f} ±{iqr:.3f}"])
    print(tabulate(rows, headers=["variant", "params", f"ms per {args.mode} step (median)",
                                  "speed-up vs original (paired median ±IQR)"]))
    m, iqr = s_vs_lrd
    print(f"\nlrd+search vs lrd: {m:.3f}x (paired median over {args.rounds} rounds, IQR {iqr:.3f}); "
          f"params {n_search:,} / {n_lrd:,} = {n_search / n_lrd:.1%} of the un-searched model")
    print(f"compile: lrd {t_lrd:.1f} s; lrd+search cold {t_cold:.1f} s ({search_note}); "
          f"warm {t_warm:.1f} s ({warm_note}); same architecture: {same_arch}")
    print()
    print(cold.lrd.report())
    out = Path(args.out) if args.out else RESULTS / f"rank_search-{args.model}-{args.mode}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": machine_text, "args": vars(args) | {"cache": None if tmp else args.cache},
        "torch": torch.__version__, "threads": torch.get_num_threads(), "load": [load0, load1],
        "params": {"original": n_orig, "lrd": n_lrd, "lrd+search": n_search},
        "ms_median": {k: v * 1e3 for k, v in med.items()},
        "speedup_vs_original": {k: {"median": v[0], "iqr": v[1]} for k, v in sp.items()},
        "search_vs_lrd": {"median": s_vs_lrd[0], "iqr": s_vs_lrd[1]},
        "compile_s": {"lrd": t_lrd, "search_cold": t_cold, "search_warm": t_warm},
        "notes": {"cold": search_note, "warm": warm_note}, "same_architecture": same_arch,
        "plan": cold.lrd.plan,
    }
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nwrote {out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
