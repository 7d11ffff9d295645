"""check_speed: time the whole compiled model against the original on the example inputs."""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Optional

import torch
import torch.nn as nn

from .. import dist
from ..context import CompileContext
from ..cost.timer import (autocast_context, current_cost_fn, current_fake_clock, machine_load, measure_rounds,
                          module_step, others_load, setting_of, summarize)
from ..errors import ConfigError
from ..pipeline import PassResult

MIN_BLOCK_S = {"cuda": 0.002, "cpu": 0.02}   # shortest timed block, as in the rank search
MIN_ROUNDS = 7                               # paired rounds of original vs compiled model
BUSY_LOAD = 0.5                              # other processes' load per core that counts as busy


def wants_check(cfg) -> bool:
    """Config.whole_model_check; None (default): on whenever the rank search is."""
    on = cfg.whole_model_check
    return bool(on) if on is not None else cfg.rank_search is not None


def check_speed(ctx: CompileContext):
    """Factory of the whole-model check: per-layer timings do not always add up, so the compiled model
    and the original are timed side by side on the example inputs, in the same precision, memory
    format and execution form as the rank search, in its mode ("infer" without a search, and always
    with fuse_inference). The result goes to ctx.whole_model (gm.lrd.whole_model) and the
    report. The graph is not changed; timing runs on copies, so no BatchNorm statistic moves."""

    def run(gm):
        cfg = ctx.config
        if ctx.whole_model_done:    # the guard timed this very model last (or gave every layer back)
            return PassResult(gm, False)
        if ctx.example_inputs is None:
            raise ConfigError("whole_model_check=True needs example_inputs: the whole model is timed on them")
        cost_fn = current_cost_fn()
        if cost_fn is not None and cfg.whole_model_check is not True and current_fake_clock() is None:
            ctx.notes.append("whole-model check skipped: a cost function stands in for the device "
                             "(whole_model_check=True times the two whole models with it)")
            return PassResult(gm, False)
        result = None
        if dist.rank() == 0:
            try:
                result = _measure(gm, ctx, cost_fn)
            except Exception as e:   # the check is advice: the compiled model stands without it
                result = {"error": f"{type(e).__name__}: {e}"}
        result = dist.broadcast_object(result)
        ctx.whole_model = result
        if "error" in result:
            ctx.notes.append(f"whole-model check failed, the speed of the whole model is not known: "
                             f"{result['error'][:300]}")
        return PassResult(gm, False)

    run.name = "check_speed"
    return run


def _mode(cfg) -> str:
    if cfg.fuse_inference:
        return "infer"          # a fused model runs in eval mode only
    return cfg.rank_search.mode if cfg.rank_search is not None else "infer"


def _measure(gm: nn.Module, ctx: CompileContext, cost_fn, *, private: Optional[dict] = None) -> dict:
    """Time `gm` against the original. Both are deep-copied (timing in "train" mode moves BatchNorm
    statistics), unless `private` is given: {"original": a copy of ctx.model the caller keeps for its
    timings, "lrd": True when gm itself is a throw-away copy}."""
    cfg = ctx.config
    dev = ctx.device
    mode = _mode(cfg)
    setting = setting_of(ctx)
    inputs = tuple(ctx.example_inputs)
    private = private or {}
    from ..fastcalls import fast_module_calls_

    def copies(first: bool) -> dict:
        # the caller's private copies the first time; fresh ones after a failed CUDA-graph capture
        lrd = gm if first and private.get("lrd") else copy.deepcopy(gm)
        fast_module_calls_(lrd)     # timed with the code the returned model will run
        original = private.get("original") if first else None
        return {"original": original if original is not None else copy.deepcopy(ctx.model), "lrd": lrd}
    models = copies(True)
    note = None
    if cost_fn is not None and current_fake_clock() is None:
        shape = tuple(inputs[0].shape) if isinstance(inputs[0], torch.Tensor) else ()
        samples = {}
        with autocast_context(dev, setting.amp):
            for label, m in models.items():
                if setting.memory_format == "channels_last":
                    m = m.to(memory_format=torch.channels_last)
                t = cost_fn(m, shape, mode)
                samples[label] = [float(v) for v in t] if isinstance(t, (list, tuple)) else [float(t)]
        source = "cost function"
    else:
        try:
            steps = {k: module_step(m, inputs, device=dev, mode=mode, setting=setting, label=k, copy_module=False)
                     for k, m in models.items()}
        except ConfigError:
            raise
        except Exception as e:
            if setting.exec_form != "cuda_graph":
                raise
            # a model that cannot be captured whole (host syncs, dynamic shapes): time it eagerly
            note = f"not capturable as one CUDA graph ({type(e).__name__}), timed eagerly"
            setting = replace(setting, exec_form="eager")
            models = copies(False)
            steps = {k: module_step(m, inputs, device=dev, mode=mode, setting=setting, label=k, copy_module=False)
                     for k, m in models.items()}
        rounds = max(MIN_ROUNDS, int(cfg.timing.repeats))
        samples = measure_rounds(steps, device=dev, rounds=rounds, warmup=1,
                                 min_time_s=MIN_BLOCK_S["cuda" if dev.type == "cuda" else "cpu"])
        source = "fake clock" if current_fake_clock() is not None else "device"
    orig, lrd = summarize(samples["original"]), summarize(samples["lrd"])
    # paired per-round ratios: drift between rounds hits both models alike
    ratios = [a / b for a, b in zip(samples["original"], samples["lrd"]) if b > 0]
    speed = summarize(ratios) if ratios else None
    load = others_load(*machine_load()) if source == "device" else None
    return {
        "mode": mode,
        "setting": setting.describe(),
        "amp": setting.amp,
        "memory_format": setting.memory_format,
        "exec_form": setting.exec_form,
        "device": str(dev),
        "source": source,
        "original_s": orig.median_s,
        "lrd_s": lrd.median_s,
        "speedup": speed.median_s if speed else None,
        "speedup_iqr": speed.iqr_s if speed else None,
        "rounds": len(ratios),
        "faster": bool(speed and speed.median_s > 1.0),
        "busy": load is not None and load > BUSY_LOAD,
        "note": note,
    }


def describe(wm: Optional[dict]) -> list[str]:
    """Report lines for gm.lrd.whole_model (empty when the check did not run)."""
    if not wm:
        return []
    if "error" in wm:
        return []               # the note says it
    where = f"{wm['mode']}, {wm['setting']}, {wm['device']}, example inputs"
    if wm.get("source") != "device":
        where += f", timed by a {wm['source']}"
    sp = wm.get("speedup")
    line = (f"whole model ({where}): original {wm['original_s'] * 1e3:.3f} ms, LRD {wm['lrd_s'] * 1e3:.3f} ms "
            f"per step")
    if sp is not None:
        line += f", speed-up {sp:.2f}x"
        if wm.get("rounds", 0) > 1:
            line += f" (paired median of {wm['rounds']} rounds, IQR {wm['speedup_iqr']:.2f})"
    lines = [line]
    if not wm.get("faster") and wm.get("all_given_back"):
        lines.append(f"the compiled model is NOT faster than the original here"
                     + (f" ({sp:.2f}x)" if sp is not None else "")
                     + ": the whole-model guard gave every factorized layer back, and what remains is the traced "
                     "graph's own overhead; keep the original model")
    elif not wm.get("faster"):
        lines.append(f"the decomposed model is NOT faster than the original here"
                     + (f" ({sp:.2f}x)" if sp is not None else "")
                     + ": the per-layer gains did not add up for the whole model; search in the mode and "
                     "precision you run, try a rank_budget, or keep the original model")
    if wm.get("busy"):
        lines.append("(the machine was busy during the whole-model check: time again on an idle machine)")
    if wm.get("note"):
        lines.append(f"({wm['note']})")
    return lines
