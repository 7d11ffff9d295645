"""Per-layer report tables (tabulate), built from the records on the graph."""
from __future__ import annotations

from tabulate import tabulate

from .plan import LayerRecord


def _shape(s) -> str:
    return "x".join(str(d) for d in s) if s else "-"


def _ranks(rec: LayerRecord) -> str:
    if not rec.ranks and not rec.estimate:
        return "-"
    est = "/".join(map(str, rec.estimate or []))
    fin = "/".join(map(str, rec.ranks or [])) if rec.ranks else "-"
    return fin if est == fin else f"{est} -> {fin}"


def _ms(t) -> str:
    return f"{t * 1e3:.3f}" if t is not None else "-"


def _mflops(f: int) -> str:
    if not f:
        return "-"
    return f"{f / 1e6:.1f}" if f >= 1e6 else f"{f / 1e6:.3f}"


def format_report(info, *, all_layers: bool = True) -> str:
    recs = list(info.records().values())
    timed = any(r.time_original_s is not None for r in recs)
    headers = ["layer", "kind", "in -> out", "ranks (est -> chosen)", "params", "params LRD",
               "MFLOPs", "MFLOPs LRD"]
    if timed:
        headers += ["ms orig", "ms est", "ms chosen"]
    headers += ["decision", "reason"]
    rows = []
    for r in recs:
        if not all_layers and not r.factorized:
            continue
        row = [r.name, r.kind + (f"/{r.scheme}" if r.scheme else ""),
               f"{_shape(r.in_shape)} -> {_shape(r.out_shape)}", _ranks(r),
               r.params_before, r.params_after, _mflops(r.flops_before), _mflops(r.flops_after)]
        if timed:
            row += [_ms(r.time_original_s), _ms(r.time_estimate_s), _ms(r.time_chosen_s)]
        row += [r.decision, r.reason]
        rows.append(row)
    if rows:
        lines = [tabulate(rows, headers=headers, tablefmt="simple", intfmt=",",
                          disable_numparse=[0, 3, 6, 7])]
    elif recs:
        lines = ["(no layer factorized; all_layers=True lists the layers and why they were left)"]
    else:
        lines = ["(no Conv/Linear layer found in the model: nothing to factorize)"]
    lines.append("")
    lines.append(summary(info))
    return "\n".join(lines)


def totals(info) -> dict:
    recs = list(info.records().values())
    fact = [r for r in recs if r.factorized]
    return {
        "layers": len(recs),
        "factorized": len(fact),
        "reverted": sum(r.decision == "reverted" for r in recs),
        "skipped": sum(r.decision == "skipped" for r in recs),
        "layer_params_before": sum(r.params_before for r in fact),
        "layer_params_after": sum(r.params_after for r in fact),
        "model_params_before": info.params_before,
        "model_params_after": info.params_after,
        "model_flops_before": info.flops_before,
        "model_flops_after": info.flops_after,
    }


def _x(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def summary(info) -> str:
    t = totals(info)
    rows = [
        ["Conv/Linear layers", t["layers"], f"{t['factorized']} factorized, {t['reverted']} reverted, "
                                           f"{t['skipped']} skipped"],
        ["params in factorized layers", f"{t['layer_params_before']:,} -> {t['layer_params_after']:,}",
         _x(t["layer_params_before"], t["layer_params_after"]) + " fewer"],
        ["params, whole model", f"{t['model_params_before']:,} -> {t['model_params_after']:,}",
         _x(t["model_params_before"], t["model_params_after"]) + " fewer"],
    ]
    if t["model_flops_before"] and t["model_flops_after"] is not None:
        rows.append(["GFLOPs per forward (example inputs)",
                     f"{t['model_flops_before'] / 1e9:.3f} -> {t['model_flops_after'] / 1e9:.3f}",
                     _x(t["model_flops_before"], t["model_flops_after"]) + " fewer"])
    elif t["model_flops_before"] is None or t["model_flops_after"] is None:
        rows.append(["GFLOPs per forward (example inputs)", "unknown", "torch's FLOP counter failed (see note)"])
    if info.pass_times:
        rows.append(["pass times", ", ".join(f"{k} {v:.2f}s" for k, v in info.pass_times.items()), ""])
    out = tabulate(rows, tablefmt="plain")
    if info.fallback_parts:
        out += "\n\nParts traced separately (whole-model tracing failed there):"
        for path, why in info.fallback_parts.items():
            out += f"\n  {path}: {why[:160]}"
    for note in info.notes:
        out += f"\n{note}"
    from .passes.check_speed import describe   # whole compiled model vs original, timed
    for line in describe(getattr(info, "whole_model", None)):
        out += f"\n{line}"
    return out
