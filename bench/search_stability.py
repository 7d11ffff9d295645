"""Does the per-layer rank search choose the same ranks run after run? Searches one model several times
afresh (no timing cache) and reports the layers whose ranks differ, the parameter counts and the seconds.

    python -m bench.search_stability --model resnet50 --batch 8 --size 160 --runs 3 --threads 2
    python -m bench.search_stability --model resnet18 --runs 2 --out /tmp/stab
    python -m bench.search_stability --layers 'layer3.*.conv2,layer4.0.conv1' --runs 3   # a few layers only

Each run is its own child process (so one run's warm caches and allocator do not help the next), with
lrd_fx.compile(model, (randn(batch, 3, size, size),), ratio=R, rank_search=MODE, cache=False); --layers
(comma-separated globs of layer names) factorizes and searches only those layers, which takes a fraction
of the time (each layer is timed on its own, so its decision does not depend on the others). Results:
a summary on stdout (with each run's reason for the layers that differ) and
bench/results/search_stability-<model>-<date>.json (or --out PREFIX; per run and layer also the reason
and every timed candidate). Run it on an otherwise idle machine: the search's own report says how busy
it found the machine.
"""
from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(args) -> dict:
    import torch
    import lrd_fx
    from bench.harness import make_model
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = make_model(args.model, args.size).eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    kw = {}
    if args.layers:
        patterns = [g for g in args.layers.split(",") if g]
        kw["filter_fn"] = lambda name, m: any(fnmatch.fnmatchcase(name, g) for g in patterns)
    t0 = time.perf_counter()
    gm = lrd_fx.compile(model, (x,), ratio=args.ratio, rank_search=args.mode, cache=False, progress=False, **kw)
    plan = {n: r for n, r in gm.lrd.plan.items() if r.get("decision") != "skipped" or not args.layers}
    return {"seconds": time.perf_counter() - t0,
            "params": sum(p.numel() for p in gm.parameters()),
            "plan": {n: [r.get("ranks"), r.get("decision")] for n, r in plan.items()},
            "details": {n: {"reason": r.get("reason"), "candidates": r.get("candidates")} for n, r in plan.items()},
            "notes": [n for n in gm.lrd.notes if n.startswith("rank search")]}


def differing(plans: list) -> dict:
    """{layer: [its entry in each run]} for the layers whose entry is not the same in every run."""
    names = list(dict.fromkeys(n for p in plans for n in p))
    return {n: [p.get(n) for p in plans] for n in names
            if len({json.dumps(p.get(n)) for p in plans}) > 1}


def summary(runs: list) -> list:
    """Lines of the stdout summary."""
    diff = differing([r["plan"] for r in runs])
    total = len(runs[0]["plan"]) if runs else 0
    params = ", ".join("%.3f M" % (r["params"] / 1e6) for r in runs)
    seconds = ", ".join("%.1f" % r["seconds"] for r in runs)
    lines = [f"{len(runs)} runs: parameters {params}; seconds {seconds}",
             f"layers not given the same ranks in every run: {len(diff)} of {total}"]
    for n, es in diff.items():
        lines.append(f"  {n}: {' | '.join(str(e[0]) + ('' if e and e[1] != 'reverted' else ' (reverted)') for e in es)}")
        lines += [f"    run {i + 1}: {r['details'][n]['reason']}" for i, r in enumerate(runs)
                  if n in r.get("details", {})]
    for i, r in enumerate(runs):
        lines += [f"run {i + 1}: " + note.replace("\n", " / ") for note in r["notes"]]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.search_stability", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--mode", choices=["infer", "train"], default="infer")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", default="", help="comma-separated globs of layer names: search only these")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--out", default=None, help="results prefix (default bench/results/search_stability-...)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.runs < 2:
        p.error("--runs must be at least 2")
    if args.child:
        print("RESULT " + json.dumps(_child(args)), flush=True)
        return 0
    child = [sys.executable, "-m", "bench.search_stability", "--child", "--model", args.model, "--batch",
             str(args.batch), "--size", str(args.size), "--ratio", str(args.ratio), "--mode", args.mode,
             "--seed", str(args.seed)] + (["--threads", str(args.threads)] if args.threads else []) + (
                ["--layers", args.layers] if args.layers else [])
    runs = []
    for i in range(args.runs):
        got = subprocess.run(child, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
        line = next((ln for ln in got.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"run {i + 1} failed (exit {got.returncode}):\n{got.stderr[-2000:]}", file=sys.stderr)
            return 1
        runs.append(json.loads(line[len("RESULT "):]))
        print(f"run {i + 1}: {runs[-1]['params'] / 1e6:.3f} M parameters, {runs[-1]['seconds']:.1f} s", flush=True)
    from bench.harness import load_avg
    lines = summary(runs)
    print("\n".join(lines))
    out = args.out or os.path.join(ROOT, "bench", "results",
                                   f"search_stability-{args.model}-{datetime.date.today().isoformat()}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump({"command": "python -m bench.search_stability " + " ".join(argv or sys.argv[1:]),
                   "load_avg_end": load_avg(), "runs": runs, "differing": differing([r["plan"] for r in runs])},
                  f, indent=1)
    print(f"wrote {out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
