"""Time a mixture-of-experts model against its compiled forms (inference, this machine).

    python bench/moe_speed.py [--arch mixtral|llama4] [--experts-impl grouped_mm|eager] [--ratio 0.25] [--rounds 7]
                              [--threads 2] [--train]

Random weights, hidden 512, 8 experts of width 1024, 2 layers, batch 2 x 128 tokens: transformers'
MixtralForCausalLM (top-2; its experts decorated by use_experts_implementation) or Llama4ForCausalLM (top-1;
every expert runs on its slice of the router-scaled token copies, torch.bmm). Variants, timed interleaved,
medians of the rounds, ratios against the original in the same run:
- original: transformers' model (Mixtral: with the experts implementation asked for);
- stand-in loop: the original with each experts module swapped for lrd_fx.moe's stand-in (Experts,
  BatchedExperts), nothing factorized: what the stand-in's loop over the experts costs (compile itself puts
  transformers' module back where no layer of it is factorized);
- lrd: compiled at `--ratio`, the experts factorized expert by expert.
With --train, a training step (forward with labels, backward, an SGD step) instead, and a fourth variant:
- lrd+seqfreeze: `lrd` with `freeze="sequential"` (in the epoch where its first group of factor layers is frozen).
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=("mixtral", "llama4"), default="mixtral")
    ap.add_argument("--experts-impl", default=None, help="transformers' experts implementation (default: its own; "
                                                        "Mixtral only)")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train", action="store_true", help="time a training step instead of inference")
    args = ap.parse_args(argv)
    import transformers

    import lrd_fx
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    shape = dict(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, max_position_embeddings=256)
    if args.arch == "llama4":
        cfg = transformers.Llama4TextConfig(**shape, intermediate_size_mlp=1024, head_dim=64, num_experts_per_tok=1,
                                            interleave_moe_layer_step=1, attention_chunk_size=128)
        model = transformers.Llama4ForCausalLM(cfg).eval()
    else:
        cfg = transformers.MixtralConfig(**shape, num_experts_per_tok=2)
        if args.experts_impl:
            cfg._experts_implementation = args.experts_impl
        model = transformers.MixtralForCausalLM(cfg).eval()
    ids = torch.randint(0, 1000, (2, 128))
    variants = {
        "original": model,
        "stand-in loop": with_stand_ins(model),
        "lrd": lrd_fx.compile(model, (ids,), ratio=args.ratio, progress=False),
    }
    if args.train:
        variants["lrd+seqfreeze"] = lrd_fx.compile(model, (ids,), ratio=args.ratio, freeze="sequential",
                                                   progress=False)
        opts = {}
        for k, v in variants.items():
            v.train()
            opts[k] = torch.optim.SGD([p for p in v.parameters() if p.requires_grad], lr=1e-4)

    def step(k, v):
        if not args.train:
            with torch.no_grad():
                v(ids)
            return
        v(ids, labels=ids).loss.backward()
        opts[k].step()
        opts[k].zero_grad(set_to_none=True)

    times: dict = {k: [] for k in variants}
    for k, v in variants.items():
        step(k, v)
    for _ in range(args.rounds):
        for k, v in variants.items():
            t = time.perf_counter()
            step(k, v)
            times[k].append(time.perf_counter() - t)
    impl = model.config._experts_implementation if args.arch == "mixtral" else "torch.bmm (Llama4TextExperts)"
    print(f"{args.arch}, {'training step' if args.train else 'inference'}; "
          f"experts implementation: {impl}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {args.threads} threads, {args.rounds} rounds")
    base = statistics.median(times["original"])
    for k, v in variants.items():
        med = statistics.median(times[k])
        params = sum(p.numel() for p in v.parameters())
        print(f"{k:14s} {params / 1e6:6.2f} M params  {med * 1e3:7.1f} ms  {base / med:.2f}x")
    return 0


def with_stand_ins(model):
    """A copy of `model` whose experts modules run as lrd_fx.moe's stand-ins, nothing factorized."""
    import copy

    from lrd_fx.torch_modules import use_stand_ins_
    m = copy.deepcopy(model)
    use_stand_ins_(m)        # what compile gives its copy (these models have no other module it replaces)
    return m


if __name__ == "__main__":
    raise SystemExit(main())
