"""Time a Mixtral-shaped mixture-of-experts model against its compiled forms (inference, this machine).

    python bench/moe_speed.py [--experts-impl grouped_mm|eager] [--ratio 0.25] [--rounds 7] [--threads 2]

Random weights (transformers' MixtralForCausalLM: hidden 512, 8 experts of width 1024, top-2, 2 layers),
batch 2 x 128 tokens. Variants, timed interleaved, medians of the rounds, ratios against the original in
the same run:
- original: transformers' model, with the experts implementation asked for;
- stand-in kept: compiled with every layer kept (`skip=["*"]`), i.e. what lrd_fx.moe.Experts' loop costs;
- lrd: compiled at `--ratio`, the experts factorized expert by expert.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts-impl", default=None, help="transformers' experts implementation (default: its own)")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import transformers

    import lrd_fx
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = transformers.MixtralConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                     num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
                                     num_experts_per_tok=2, max_position_embeddings=256)
    if args.experts_impl:
        cfg._experts_implementation = args.experts_impl
    model = transformers.MixtralForCausalLM(cfg).eval()
    ids = torch.randint(0, 1000, (2, 128))
    variants = {
        "original": model,
        "stand-in kept": lrd_fx.compile(model, (ids,), ratio=args.ratio, skip=["*"], progress=False),
        "lrd": lrd_fx.compile(model, (ids,), ratio=args.ratio, progress=False),
    }
    times: dict = {k: [] for k in variants}
    with torch.no_grad():
        for v in variants.values():
            v(ids)
        for _ in range(args.rounds):
            for k, v in variants.items():
                t = time.perf_counter()
                v(ids)
                times[k].append(time.perf_counter() - t)
    print(f"experts implementation: {model.config._experts_implementation}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {args.threads} threads, {args.rounds} rounds")
    base = statistics.median(times["original"])
    for k, v in variants.items():
        med = statistics.median(times[k])
        params = sum(p.numel() for p in v.parameters())
        print(f"{k:14s} {params / 1e6:6.2f} M params  {med * 1e3:7.1f} ms  {base / med:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
