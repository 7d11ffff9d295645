"""`python -m bench.zoo`: compile the torchvision classification zoo and a timm sample; check ratio 0.5, exactness at
rank="full" (output and inner activations) and save/load; write bench/results/zoo-<date>.{json,md}."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Optional

import torch

# one small variant per timm family (smallest of the family that timm 1.0 ships); names missing from the
# installed timm are dropped at run time and listed in the results
TIMM_FAMILIES = [
    "resnet10t", "resnetv2_18", "regnetx_002", "regnety_002", "regnetz_b16", "efficientnet_b0",
    "mobilenetv2_035", "mobilenetv3_small_050", "mobilenetv4_conv_small", "ghostnet_050", "mnasnet_small",
    "lcnet_035", "fbnetv3_b", "hardcorenas_a", "rexnet_100", "densenet121", "dla46_c", "dpn48b",
    "cs3darknet_s", "darknet17", "ese_vovnet19b_slim", "hrnet_w18_small", "res2net50_14w_8s", "resnest14d",
    "skresnet18", "selecsls42b", "xception41", "nf_regnet_b0", "convnext_atto", "convnextv2_atto",
    "efficientformer_l1", "efficientformerv2_s0", "levit_128s", "mobilevit_xxs", "mobilevitv2_050",
    "edgenext_xx_small", "poolformerv2_s12", "vit_tiny_patch16_224", "deit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224", "coat_lite_tiny", "crossvit_tiny_240", "pit_ti_224",
    "cait_xxs24_224", "xcit_nano_12_p16_224", "mixer_s32_224", "resmlp_12_224", "gmlp_ti16_224",
    "convit_tiny", "twins_svt_small", "pvt_v2_b0", "sequencer2d_s", "fastvit_t8", "repvit_m1",
    "tiny_vit_5m_224", "efficientvit_b0", "efficientvit_m0", "hgnetv2_b0", "mobileone_s0",
    "repghostnet_050", "ghostnetv2_100", "starnet_s050", "inception_next_atto", "gcvit_xxtiny",
    "davit_tiny", "focalnet_tiny_srf", "mvitv2_tiny", "visformer_tiny", "eva02_tiny_patch14_224",
    "maxvit_nano_rw_256", "coatnet_nano_rw_224", "hiera_tiny_224", "volo_d1_224", "nest_tiny",
    # added 2026-11-29: the smallest model of each timm 1.0.31 model module missing above (gemma4_vit's and
    # deepseek_vit's smallest have 167 M and 412 M parameters, over MAX_PARAMS; vgg and inception_v3 are
    # checked through torchvision)
    "test_mambaout", "test_vit_relpos", "cspnext_tiny", "iformer_t", "swiftformer_xs", "fasternet_t0",
    "lcnetv2_small", "shvit_s1", "vit_tiny_r_s16_p8_224", "cpubone_nano", "efficientvim_m1", "halonet_h1",
    "csatv2", "legacy_seresnet18", "lowformer_b0", "convmixer_768_32", "vitamin_small_224", "legacy_xception",
    "tnt_s_legacy_patch16_224", "rdnet_tiny", "sam2_hiera_tiny", "swinv2_cr_tiny_384",
    "swinv2_tiny_window16_256", "tresnet_m", "nextvit_small", "inception_v4", "inception_resnet_v2",
    "mobilenetv5_base", "samvit_base_patch16_224", "naflexvit_base_patch16_parfac_gap", "beit_base_patch16_224",
    "qwen3_vit_88m", "nasnetalarge", "pnasnet5large",
]

# torchvision models whose forward needs a bigger input than the sweep's 64 px
TV_SIZE = {"inception_v3": 299, "maxvit_t": 224, "vit_b_16": 224, "vit_b_32": 224, "vit_l_16": 224,
           "vit_l_32": 224, "vit_h_14": 224}
SMALL = 64
MAX_PARAMS = 150_000_000
TOO_BIG = "too big for this machine's budget (> 150M params)"


def _build(source: str, name: str, **kwargs):
    if source == "torchvision":
        import torchvision
        return torchvision.models.get_model(name, weights=None, **kwargs)
    import timm
    return timm.create_model(name, pretrained=False, **kwargs)


def meta_params(source: str, name: str) -> int:
    """Parameter count without allocating: torchvision's weights metadata, else the model built on the meta
    device (some torchvision initialisers, e.g. RegNet's, cannot run on meta)."""
    if source == "torchvision":
        import torchvision
        try:
            return int(next(iter(torchvision.models.get_model_weights(name))).meta["num_params"])
        except Exception:   # noqa: BLE001 - no weights enum: count on meta
            pass
    with torch.device("meta"):
        model = _build(source, name)
    return sum(p.numel() for p in model.parameters())


def _candidates(source: str, name: str):
    if source == "torchvision":
        yield {}, TV_SIZE.get(name, SMALL)
        return
    yield {}, SMALL
    yield {"img_size": SMALL}, SMALL
    yield {}, None          # the model's own input size (pretrained_cfg)


def _model_and_input(source: str, name: str):
    """The randomly initialised model (eval) and a batch-1 input it runs on: 64 px when it can."""
    last = None
    for kwargs, size in _candidates(source, name):
        try:
            torch.manual_seed(0)
            model = _build(source, name, **kwargs).eval()
            if size is None:
                from lrd_fx.models import default_input_shape
                shape = default_input_shape(model, name)
            else:
                shape = (1, 3, size, size)
            x = torch.randn(*shape)
            with torch.no_grad():
                model(x)
            return model, x, kwargs
        except Exception as e:      # noqa: BLE001 - try the next input size
            last = e
    raise last


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            t = _first_tensor(o)
            if t is not None:
                return t
    if isinstance(out, dict):
        for o in out.values():
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


def _probe(model, name: str):
    """The module whose output is `name`'s output: a factor chain is inlined into the graph as its
    factor layers, so its last factor is the one that runs."""
    mod = model.get_submodule(name)
    kids = list(mod.children())
    if kids and kids[-1].__class__.__module__.startswith("torch.nn") and name and \
            type(mod).__name__ == "FactorChain":
        return kids[-1]
    return mod


def _activations(model, x, names):
    """First output of each named module on one forward (inner activations, not just the logits)."""
    acts, handles = {}, []
    for n in names:
        try:
            mod = _probe(model, n)
        except AttributeError:
            continue

        def hook(_m, _i, out, n=n):
            t = _first_tensor(out)
            if n not in acts and t is not None:
                acts[n] = t.detach().clone()
        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            y = _first_tensor(model(x))
    finally:
        for h in handles:
            h.remove()
    return y, acts


def _rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / (b.norm() + 1e-30))


def check_model(source: str, name: str, options: Optional[dict] = None) -> dict:
    """Every check on one model, compiled with `options` (e.g. decompose_grouped=True) besides the ratio or
    rank; raises nothing (errors become the record's status)."""
    options = options or {}
    import lrd_fx
    rec: dict = {"model": name, "source": source, "status": "ok"}
    try:
        model, x, kwargs = _model_and_input(source, name)
        rec["input"] = list(x.shape)
        if kwargs:
            rec["kwargs"] = kwargs
        with torch.no_grad():
            y_ref = _first_tensor(model(x))
        t0 = time.perf_counter()
        gm = lrd_fx.compile(model, (x,), ratio=0.5, **options)
        rec["compile_s"] = round(time.perf_counter() - t0, 2)
        recs = gm.lrd.records().values()
        rec["layers_factorized"] = sum(r.factorized for r in recs)
        rec["layers_skipped"] = sum(not r.factorized for r in recs)
        rec["params_before"] = sum(p.numel() for p in model.parameters())
        rec["params_after"] = sum(p.numel() for p in gm.parameters())
        rec["fallback_parts"] = len(gm.lrd.fallback_parts)
        rec["traced"] = "whole" if not gm.lrd.fallback_parts else "fallback"
        with torch.no_grad():
            y = _first_tensor(gm.eval()(x))
        problems = []
        if rec["params_after"] >= rec["params_before"]:
            problems.append("ratio 0.5: params not reduced")
        if y is None or y.shape != y_ref.shape or not torch.isfinite(y).all():
            problems.append("ratio 0.5: output not finite or wrong shape")

        # save/load round trip of the ratio-0.5 model
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "m.lrd")
            lrd_fx.save(gm, path)
            gm2 = lrd_fx.load(model, path, (x,)).eval()
            with torch.no_grad():
                y2 = _first_tensor(gm2(x))
        rec["save_load_rel_err"] = _rel_err(y2, y)
        if not rec["save_load_rel_err"] <= 1e-5:
            problems.append(f"save/load changed the output (rel err {rec['save_load_rel_err']:.2e})")
        del gm, gm2

        # rank="full": exact on the output and on inner activations (factorized layers' outputs included:
        # random models can have outputs that ignore the weights, e.g. zero-initialised heads)
        full = lrd_fx.compile(model, (x,), rank="full", **options).eval()
        fact_names = [n for n, r in full.lrd.records().items() if r.factorized]
        # only layers the original calls as modules have an activation to compare (not one whose weight the
        # original passes to F.linear itself, which compile's layer_calls pass made a call: timm's EVA qkv)
        called = set(_activations(model, x, fact_names)[1])
        fact_names = [n for n in fact_names if n in called]
        inner = [n for n, m in model.named_modules() if n and not list(m.children())]
        step = max(1, len(inner) // 12)
        names = list(dict.fromkeys(inner[::step] + fact_names[::max(1, len(fact_names) // 12)]))
        yr, acts_ref = _activations(model, x, names)
        yf, acts_full = _activations(full, x, names)
        errs = {n: _rel_err(acts_full[n], acts_ref[n]) for n in acts_ref
                if n in acts_full and acts_full[n].shape == acts_ref[n].shape and acts_ref[n].norm() > 0}
        rec["full_output_rel_err"] = _rel_err(yf, yr)
        rec["full_activations_checked"] = len(errs)
        rec["full_factorized_checked"] = sum(n in errs for n in fact_names)
        rec["full_max_activation_rel_err"] = max(errs.values(), default=None)
        worst = max([rec["full_output_rel_err"], *errs.values()])
        if not worst <= 1e-3:
            problems.append(f"rank='full' not exact (worst rel err {worst:.2e})")
        if fact_names and not rec["full_factorized_checked"]:
            problems.append("rank='full': no factorized layer's activation could be compared")
        if problems:
            rec["status"] = "fail: " + "; ".join(problems)
    except Exception as e:      # noqa: BLE001 - recorded, the sweep goes on
        rec["status"] = "error"
        rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        rec["lrd_error"] = isinstance(e, lrd_fx.LRDError)
        rec["traceback_tail"] = traceback.format_exc()[-1200:]
    return rec


def model_list(args) -> list[tuple[str, str]]:
    out = []
    if args.only:
        import torchvision
        for n in args.only.split(","):
            src = "torchvision" if n in torchvision.models.list_models(module=torchvision.models) else "timm"
            out.append((src, n))
        return out
    if args.torchvision:
        import torchvision
        out += [("torchvision", n) for n in torchvision.models.list_models(module=torchvision.models)]
    if args.timm:
        fams = TIMM_FAMILIES[: args.families] if args.families else TIMM_FAMILIES
        out += [("timm", n) for n in fams]
    return out


def to_markdown(results: list[dict]) -> str:
    lines = ["| model | source | input | status | traced | factorized / skipped | params before → after (0.5) "
             "| full-rank max rel err (output, activations checked) | compile s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        st = r["status"] if r["status"] != "error" else "error: " + r.get("error", "")[:120].replace("|", "/")
        st = st.replace("\n", " ")
        inp = "x".join(str(s) for s in r.get("input", [])[2:]) or "-"
        fs = f"{r['layers_factorized']} / {r['layers_skipped']}" if "layers_factorized" in r else "-"
        pp = (f"{r['params_before'] / 1e6:.1f}M → {r['params_after'] / 1e6:.1f}M"
              if "params_after" in r else (f"{r['params_before'] / 1e6:.1f}M" if "params_before" in r else "-"))
        if "full_output_rel_err" in r:
            worst = max(r["full_output_rel_err"], r["full_max_activation_rel_err"] or 0.0)
            ex = f"{worst:.1e} ({r['full_activations_checked']})"
        else:
            ex = "-"
        traced = r.get("traced", "-")
        if traced == "fallback":
            traced = f"fallback ({r['fallback_parts']} parts)"
        lines.append(f"| {r['model']} | {r['source']} | {inp} | {st} | {traced} | {fs} | {pp} | {ex} "
                     f"| {r.get('compile_s', '-')} |")
    n_ok = sum(r["status"] == "ok" for r in results)
    lines.append("")
    lines.append(f"{n_ok} of {len(results)} ok.")
    return "\n".join(lines) + "\n"


def _write(results, out, meta):
    with open(out + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write(to_markdown(results))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.zoo", description=__doc__)
    p.add_argument("--torchvision", action="store_true", help="the torchvision classification zoo")
    p.add_argument("--timm", action="store_true", help="one small model per timm family")
    p.add_argument("--families", type=int, default=0, help="only the first N timm families")
    p.add_argument("--only", default="", help="comma-separated model names (torchvision or timm)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per model (each runs in a subprocess)")
    p.add_argument("--max-params", type=int, default=MAX_PARAMS, help="skip bigger models")
    p.add_argument("--threads", type=int, default=1, help="torch threads per model")
    p.add_argument("--out", default="", help="output path without suffix (default bench/results/zoo-<date>)")
    p.add_argument("--decompose-grouped", action="store_true", help="compile with decompose_grouped=True")
    p.add_argument("--worker", nargs=3, metavar=("SOURCE", "NAME", "RESULT_JSON"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        torch.set_num_threads(args.threads)
        source, name, path = args.worker
        with open(path, "w") as f:
            json.dump(check_model(source, name, {"decompose_grouped": True} if args.decompose_grouped else {}), f)
        return 0
    if not (args.torchvision or args.timm or args.only):
        args.torchvision = args.timm = True
    out = args.out or os.path.join("bench", "results", f"zoo-{datetime.date.today().isoformat()}")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    todo = model_list(args)
    import timm
    meta = {"torch": torch.__version__, "timm": timm.__version__, "threads": args.threads,
            "decompose_grouped": args.decompose_grouped,
            "timeout_s": args.timeout, "max_params": args.max_params, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    results = []
    sized = []
    for source, name in todo:
        if source == "timm" and not timm.is_model(name):
            results.append({"model": name, "source": source, "status": "not run: not in this timm version"})
            continue
        try:
            n = meta_params(source, name)
        except Exception:   # noqa: BLE001 - size unknown: run it anyway
            n = 0
        if n > args.max_params:
            results.append({"model": name, "source": source, "params_before": n, "status": "not run: " + TOO_BIG})
            continue
        sized.append((n, source, name))
    sized.sort()            # smallest first: the most models in a given time
    for _, source, name in sized:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tf:
            path = tf.name
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "bench.zoo", "--threads", str(args.threads),
                                   *(["--decompose-grouped"] if args.decompose_grouped else []),
                                   "--worker", source, name, path], timeout=args.timeout,
                                  capture_output=True, text=True)
            try:
                with open(path) as f:
                    rec = json.load(f)
            except (OSError, ValueError):
                rec = {"model": name, "source": source, "status": "error",
                       "error": f"worker died (exit {proc.returncode}): {proc.stderr[-300:]}"}
        except subprocess.TimeoutExpired:
            rec = {"model": name, "source": source, "status": f"timeout: over {args.timeout:.0f}s"}
        finally:
            if os.path.exists(path):
                os.unlink(path)
        rec["wall_s"] = round(time.perf_counter() - t0, 1)
        results.append(rec)
        print(f"{name:40s} {rec['status'][:90]}  ({rec['wall_s']}s)", flush=True)
        _write(results, out, meta)      # after every model: an interrupted run keeps what it measured
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    _write(results, out, meta)
    print(f"wrote {out}.json and {out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
