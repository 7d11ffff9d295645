"""`lrd-fx` console command: compile a named model and print its report; manage the timing cache."""
from __future__ import annotations

import argparse
import sys

from .errors import ConfigError, LRDError


def _shape(text: str) -> tuple:
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input {text!r}: write it as NxCxHxW, e.g. 1x3x224x224")
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"--input {text!r}: every dimension must be >= 1")
    return dims


def _rank(text: str):
    if text in ("full", "vbmf"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rank {text!r}: an int, 'full' or 'vbmf'")


def cmd_compile(args) -> int:
    import torch

    import lrd_fx
    from .models import create_model, default_input_shape, load_weights
    model = create_model(args.model, **({} if args.num_classes is None else {"num_classes": args.num_classes}))
    if args.weights:
        load_weights(model, args.weights, args.model)
    model.eval()
    shape = args.input or default_input_shape(model, args.model)
    x = torch.randn(*shape)
    if args.channels_last:
        if len(shape) != 4:
            raise ConfigError(f"--channels-last takes a 4-D input (NxCxHxW), got --input {'x'.join(map(str, shape))}")
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    overrides = dict(debug=args.debug, conv_scheme=args.conv_scheme, decompose_grouped=args.decompose_grouped,
                     fuse_inference=args.fuse_inference)
    for key in ("ratio", "rank", "energy", "rank_search", "rank_budget", "amp", "freeze", "freeze_period",
                "freeze_group", "dump_dir"):
        val = getattr(args, key)
        if val is not None:
            overrides[key] = val
    if args.skip:
        overrides["skip"] = tuple(args.skip)
    if args.no_guard:
        overrides["whole_model_guard"] = False
    gm = lrd_fx.compile(model, (x,), **overrides)
    print(f"{args.model}{', weights ' + args.weights if args.weights else ' (random weights)'}, "
          f"input {'x'.join(map(str, shape))}{' channels_last' if args.channels_last else ''}")
    print(gm.lrd.report(all_layers=not args.factorized_only))
    if args.save:
        lrd_fx.save(gm, args.save)
        print(f"saved plan and weights to {args.save}")
    return 0


def cmd_cache(args) -> int:
    from .cost import cache
    if args.action == "info":
        for k, v in cache.cache_info(args.path).items():
            print(f"{k}: {v}")
    else:
        n = cache.cache_clear(args.path)
        print(f"timing cache cleared: {n} entries removed ({args.path or cache.default_path()})")
    return 0


def cmd_bench(args, rest) -> int:
    """Run the harness in bench/ (it lives beside the package, in the source checkout)."""
    import importlib
    import os
    sys.path.insert(0, os.getcwd())
    try:
        harness = importlib.import_module("bench.harness")
    except ImportError as e:
        raise ConfigError("`lrd-fx bench` runs the harness in bench/ of the lrd_fx source checkout: "
                          f"run it from the repository root ({e})") from e
    return harness.main(rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lrd-fx", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile a torchvision/timm model and print the per-layer report")
    c.add_argument("model", help="torchvision or timm model name, e.g. resnet50, vit_small_patch16_224")
    c.add_argument("--weights", default=None,
                   help="the model's trained weights: a .safetensors file or a tensors-only torch checkpoint "
                        "(read without running code; default: random weights)")
    c.add_argument("--num-classes", type=int, default=None,
                   help="classifier size the model is built with (a fine-tuned head; default the model's)")
    c.add_argument("--ratio", type=float, default=None, help="fraction of each layer's params kept (default 0.25)")
    c.add_argument("--rank", type=_rank, default=None, help="fixed rank: int, 'full' or 'vbmf'")
    c.add_argument("--energy", type=float, default=None, help="singular-value energy kept, in (0, 1]")
    c.add_argument("--conv-scheme", default="tucker2", choices=["tucker2", "conv_svd", "svd"],
                   help="k x k convs: tucker2 (1x1 -> kxk -> 1x1) or conv_svd (kxk -> 1x1); svd is an alias of conv_svd")
    c.add_argument("--decompose-grouped", action="store_true",
                   help="also factorize grouped convs (ResNeXt, RegNet), each group on its own")
    c.add_argument("--input", type=_shape, default=None, help="example input shape NxCxHxW (default: model's)")
    c.add_argument("--rank-search", default=None, choices=["infer", "train"], help="time candidate ranks")
    c.add_argument("--skip", action="append", default=None, metavar="PATTERN",
                   help="layers never factorized, a glob of names (repeatable), e.g. --skip fc --skip 'layer4.*'")
    c.add_argument("--rank-budget", type=float, default=None,
                   help="with --rank-search: one whole-model plan keeping this fraction of the factorized "
                        "layers' params")
    c.add_argument("--amp", default=None, choices=["bf16", "fp16", "off"],
                   help="precision the rank search times in (autocast)")
    c.add_argument("--channels-last", action="store_true",
                   help="model and example input in channels_last, as the search then times them")
    c.add_argument("--fuse-inference", action="store_true",
                   help="inference-only model: fold BatchNorm into the convs, merge adjacent linear maps")
    c.add_argument("--no-guard", action="store_true",
                   help="keep every factor even when the whole model is slower (whole_model_guard=False)")
    c.add_argument("--freeze", default=None, choices=["sequential", "static"], help="insert freezing gates")
    c.add_argument("--freeze-period", type=int, default=None, help="epochs per phase of --freeze sequential")
    c.add_argument("--freeze-group", default=None, choices=["core", "outer", "first", "last"],
                   help="group always frozen by --freeze static (default core)")
    c.add_argument("--debug", action="store_true", help="print the graph after every pass")
    c.add_argument("--dump-dir", default=None, help="write each stage's code to this directory")
    c.add_argument("--factorized-only", action="store_true", help="list only factorized layers")
    c.add_argument("--save", default=None, help="save plan + weights to this file (lrd_fx.save)")
    c.set_defaults(func=cmd_compile)
    k = sub.add_parser("cache", help="timing cache: info or clear")
    k.add_argument("action", choices=["info", "clear"])
    k.add_argument("--path", default=None, help="cache file (default $LRD_FX_CACHE or the user cache dir)")
    k.set_defaults(func=cmd_cache)
    b = sub.add_parser("bench", help="benchmark harness (same flags as python -m bench)", add_help=False)
    b.set_defaults(func=None)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        try:
            return cmd_bench(None, argv[1:])
        except LRDError as e:
            print(f"lrd-fx: error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LRDError as e:
        print(f"lrd-fx: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
