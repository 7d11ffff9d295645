"""First command of a GPU lease: does every CUDA path of lrd_fx run on this card and torch?

    python -m bench.gpu_check [--device cuda] [--budget 8] [--batch 16] [--size 112] [--skip compile,...]

One ResNet-18 (random init, batch 16, 112 px) in bf16 autocast + channels_last goes through each path the
CPU suite cannot reach: the rank search timed with replayed CUDA graphs and aligned ranks, the
whole-model check, shape_prop on fake tensors, sequential-freezing training steps across epochs, inference
fusion, save/load and torch.compile. Each check prints OK or its traceback and the script goes on; the exit status is the number
of checks that failed. About a minute on a GPU (most of it the search and torch.compile).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback

import torch

import lrd_fx


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--budget", type=float, default=8.0, help="rank search budget, seconds")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=112, help="input resolution")
    p.add_argument("--skip", default="", help="comma-separated checks to leave out: search,fake,train,fuse,save,compile")
    args = p.parse_args(argv)
    skip = {c.strip() for c in args.skip.split(",") if c.strip()}
    import torchvision

    dev = torch.device(args.device)
    print("torch", torch.__version__, "cuda", torch.version.cuda, "device",
          torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", flush=True)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=100).to(dev).to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev).to(memory_format=torch.channels_last)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16)
    failed, state = [], {}

    def check(name, fn):
        t = time.perf_counter()
        try:
            out = fn()
            print(f"OK   {name} ({time.perf_counter() - t:.1f} s){': ' + out if out else ''}", flush=True)
        except Exception:
            failed.append(name)
            print(f"FAIL {name} ({time.perf_counter() - t:.1f} s)", flush=True)
            traceback.print_exc()
            sys.stdout.flush()

    def searched():
        with amp:
            gm = lrd_fx.compile(model, (x,), ratio=0.25, rank_search="infer", rank_search_budget_s=args.budget,
                                cache=False, progress=False)
        state["gm"] = gm
        ranks = [r for rec in gm.lrd.records().values() if rec.factorized for r in (rec.ranks or ())]
        odd = [r for r in ranks if dev.type == "cuda" and r % 8]
        assert not odd, f"ranks not multiples of 8 under bf16 on CUDA: {odd}"
        print(gm.lrd.report(), flush=True)
        return f"{len(ranks)} ranks, all aligned"

    def train_seqfreeze():
        gm = lrd_fx.compile(model, (x,), ratio=0.25, freeze="sequential", progress=False)
        opt = torch.optim.SGD([q for q in gm.parameters() if q.requires_grad], lr=1e-3)
        for epoch in range(3):
            gm.lrd.freezer.set_epoch(epoch)
            for _ in range(2):
                with amp:
                    loss = gm(x).float().logsumexp(1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        torch.cuda.synchronize(dev) if dev.type == "cuda" else None
        assert torch.isfinite(loss), loss
        return f"3 epochs, loss {loss.item():.3f}"

    def fused():
        gm = lrd_fx.compile(model.eval(), (x,), ratio=0.25, progress=False).eval()
        fz = lrd_fx.fuse(gm)
        with torch.no_grad():
            a, b = gm(x), fz(x)
        err = ((a - b).abs().max() / a.abs().max()).item()
        assert err < 1e-3, err
        return f"max rel diff {err:.2e}"

    def save_load():
        gm = state.get("gm") or lrd_fx.compile(model, (x,), ratio=0.25, progress=False)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "m.lrd")
            lrd_fx.save(gm, path)
            back = lrd_fx.load(model, path, (x,))
        gm.eval(), back.eval()
        with torch.no_grad():
            err = (gm(x) - back(x)).abs().max().item()
        assert err == 0, err
        return "loaded output equal"

    def compiled():
        gm = state.get("gm") or lrd_fx.compile(model, (x,), ratio=0.25, progress=False)
        gm.train()
        cm = torch.compile(gm)
        for _ in range(3):
            with amp:
                loss = cm(x).float().mean()
            loss.backward()
        gm.eval()
        with torch.no_grad(), amp:
            a, b = gm(x).float(), torch.compile(gm)(x).float()
        err = ((a - b).abs().max() / a.abs().max()).item()
        assert err < 5e-2, err
        return f"train + infer, eval max rel diff {err:.2e}"

    def fake_forward():
        # big models run shape_prop on fake tensors: on this device, the same records and FLOPs as for real
        from lrd_fx.passes import shape_prop
        real = lrd_fx.compile(model, (x,), ratio=0.25, progress=False, cache=False)
        was = shape_prop.FAKE_MIN_BYTES
        shape_prop.FAKE_MIN_BYTES = 0
        try:
            fake = lrd_fx.compile(model, (x,), ratio=0.25, progress=False, cache=False)
        finally:
            shape_prop.FAKE_MIN_BYTES = was
        key = {n: (r.in_shape, r.out_shape, r.ranks) for n, r in real.lrd.records().items()}
        assert key == {n: (r.in_shape, r.out_shape, r.ranks) for n, r in fake.lrd.records().items()}
        assert (real.lrd.flops_before, real.lrd.flops_after) == (fake.lrd.flops_before, fake.lrd.flops_after)
        return f"{len(key)} layer records and FLOPs equal"

    for key, name, fn in (("search", "rank search (bf16, channels_last, exec auto)", searched),
                          ("fake", "shape_prop on fake tensors", fake_forward),
                          ("train", "sequential freezing training", train_seqfreeze),
                          ("fuse", "fuse_inference", fused), ("save", "save/load", save_load),
                          ("compile", "torch.compile", compiled)):
        if key not in skip:
            check(name, fn)
    print(f"gpu_check: {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}", flush=True)
    return len(failed)


if __name__ == "__main__":
    sys.exit(main())
