"""Grouped convolutions on real data: a small ResNeXt trained on scikit-learn digits, compressed with its grouped
convs kept (the default) or factorized (decompose_grouped=True), weight-only or calibrated.

    .venv/bin/python bench/accuracy_grouped.py                 # ratios 0.3 and 0.5, 3 seeds (about 5 min on 2 cores)
    .venv/bin/python bench/accuracy_grouped.py --seeds 0 --ratios 0.5 --pretrain-epochs 2   # smoke run

Per seed: a torchvision ResNet with bottleneck blocks [1, 1, 1, 1], 8 groups of width 16 (grouped 3x3 convs of
128-1024 channels) and a 1-channel stem, trained from scratch on digits at 32x32 (bench/accuracy.py's data).
Each ratio compiles it three ways, the classifier kept:
- "grouped kept": the default, grouped convs as they are; BatchNorm re-estimated (recalibrate_bn) on the
  calibration batches;
- "grouped factorized": decompose_grouped=True, weight-only factors; BatchNorm re-estimated the same way;
- "grouped factorized + calibration": decompose_grouped=True, calibration= (sequential) on the same batches.
The two factorized rows have equal parameters (checked). No fine-tuning: the test accuracy, test loss and the
test logits' relative error to the original's show what the compression alone costs.
Writes bench/results/grouped_accuracy[TAG].{json,txt}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import lrd_fx  # noqa: E402
from bench.accuracy import accuracy, batches, trained_on_digits  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")
ROWS = ("grouped kept", "grouped factorized", "grouped factorized + calibration")


def resnext() -> nn.Module:
    from torchvision.models.resnet import Bottleneck, ResNet
    m = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, groups=8, width_per_group=16)
    m.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    return m


def scores(model, x_te, y_te, ref) -> dict:
    model.eval()
    with torch.no_grad():
        out = model(x_te)
    return {"accuracy": accuracy(model, x_te, y_te), "test loss": float(F.cross_entropy(out, y_te)),
            "logit error": float((out - ref).norm() / ref.norm()),
            "params": sum(p.numel() for p in model.parameters())}


def run_seed(seed: int, args) -> dict:
    model, ref, (x, y, x_te, y_te), _ = trained_on_digits(resnext, seed, args.pretrain_epochs)
    gen = torch.Generator().manual_seed(1000 + seed)
    calib = [xb for xb, _ in batches(x, y, 64, gen)][:args.calib_batches]
    out = {"seed": seed, "original": scores(model, x_te, y_te, ref), "ratios": {}}
    print(f"seed {seed}: original {out['original']['accuracy']:.2f}% ({out['original']['params']:,} params)",
          flush=True)
    for ratio in args.ratios:
        row = {}
        for label in ROWS:
            grouped = label != "grouped kept"
            calibrated = label.endswith("calibration")
            gm = lrd_fx.compile(model, (x[:2],), ratio=ratio, skip=("fc",), decompose_grouped=grouped,
                                calibration=calib if calibrated else None, progress=False)
            if not calibrated:
                lrd_fx.recalibrate_bn(gm, calib)
            row[label] = scores(gm, x_te, y_te, ref)
            print(f"  ratio {ratio} {label}: {row[label]['accuracy']:.2f}% (test loss {row[label]['test loss']:.4f}, "
                  f"logit error {row[label]['logit error']:.3f}, {row[label]['params']:,} params)", flush=True)
        if row[ROWS[1]]["params"] != row[ROWS[2]]["params"]:
            raise SystemExit(f"ratio {ratio}: the factorized rows differ in parameters")
        out["ratios"][str(ratio)] = row
    return out


def table(runs: list, ratios: list) -> str:
    def agg(values, digits=2):
        return f"{statistics.mean(values):.{digits}f} ± {statistics.pstdev(values):.{digits}f}"
    lines = [f"original: accuracy {agg([r['original']['accuracy'] for r in runs])}%, "
             f"{runs[0]['original']['params']:,} params ({len(runs)} seeds)",
             "| ratio | variant | params | accuracy % | test loss | logit error |", "|---|---|---|---|---|---|"]
    for ratio in ratios:
        for label in ROWS:
            cells = [r["ratios"][str(ratio)][label] for r in runs]
            lines.append(f"| {ratio} | {label} | {cells[0]['params']:,} | {agg([c['accuracy'] for c in cells])} | "
                         f"{agg([c['test loss'] for c in cells], 3)} | {agg([c['logit error'] for c in cells], 3)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench/accuracy_grouped.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2])
    ap.add_argument("--ratios", type=lambda s: [float(v) for v in s.split(",")], default=[0.3, 0.5])
    ap.add_argument("--pretrain-epochs", type=int, default=8)
    ap.add_argument("--calib-batches", type=int, default=16, help="calibration batches of 64 training images")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = [run_seed(s, args) for s in args.seeds]
    text = table(runs, args.ratios)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"grouped_accuracy{args.tag}")
    with open(base + ".json", "w") as f:
        json.dump({"args": {k: v for k, v in vars(args).items() if k != "out"}, "runs": runs}, f, indent=1)
    with open(base + ".txt", "w") as f:
        f.write(text + "\n")
    print(f"wrote {base}.json and {base}.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
