"""Per-layer report tables (tabulate), built from the records on the graph."""
from __future__ import annotations

from collections import defaultdict

import torch.nn as nn
from tabulate import tabulate

from .plan import LayerRecord

# The report lists which kinds of module hold the parameters left outside Conv/Linear layers when they are
# at least this share of the model (embeddings, mixture-of-experts tensors, norms, ...), at most TOP_KINDS.
OUTSIDE_SHARE = 0.2
TOP_KINDS = 5


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


def _expert_groups(recs: list, stand_ins) -> list:
    """`recs` with the records of each mixture-of-experts projection (`<experts>.<projection>.<e>`, the
    experts a moe.Experts stand-in's path) gathered into one list, where they first appear."""
    stand_ins = set(stand_ins or ())
    out, groups = [], {}
    for r in recs:
        head, _, last = r.name.rpartition(".")
        if last.isdigit() and head.rpartition(".")[0] in stand_ins:
            if head not in groups:
                groups[head] = []
                out.append(groups[head])
            groups[head].append(r)
        else:
            out.append(r)
    return out


def _common(values, mixed: str) -> str:
    values = list(values)
    return values[0] if all(v == values[0] for v in values) else mixed


def _group_row(head: str, recs: list, timed: bool) -> list:
    """One row for the experts of a projection: their summed parameters and FLOPs, and what they share."""
    first = recs[0]

    def io(shape) -> str:     # the experts' token counts differ: [tokens, features] -> "*x<features>"
        return "x".join(["*", *map(str, shape[1:])]) if shape else "-"
    shapes = _common([f"{io(r.in_shape)} -> {io(r.out_shape)}" for r in recs if r.in_shape],
                     "varies") if any(r.in_shape for r in recs) else "- -> -"
    decisions = defaultdict(int)
    for r in recs:
        decisions[r.decision] += 1
    decision = _common([r.decision for r in recs],
                       "; ".join(f"{n} {d}" for d, n in sorted(decisions.items(), key=lambda kv: -kv[1])))
    reason = _common([r.reason for r in recs], f"(varies) {first.reason}")
    row = [f"{head}.<0-{len(recs) - 1}> ({len(recs)} experts)",
           first.kind + (f"/{first.scheme}" if first.scheme else ""), shapes,
           _common([_ranks(r) for r in recs], "varies"),
           sum(r.params_before for r in recs), sum(r.params_after for r in recs),
           _mflops(sum(r.flops_before or 0 for r in recs)), _mflops(sum(r.flops_after or 0 for r in recs))]
    if timed:
        row += ["-", "-", "-"]
    return row + [decision, reason]


def format_report(info, *, all_layers: bool = True, each_expert: bool = False) -> str:
    recs = list(info.records().values())
    timed = any(r.time_original_s is not None for r in recs)
    headers = ["layer", "kind", "in -> out", "ranks (est -> chosen)", "params", "params LRD",
               "MFLOPs", "MFLOPs LRD"]
    if timed:
        headers += ["ms orig", "ms est", "ms chosen"]
    headers += ["decision", "reason"]
    rows = []
    items = recs if each_expert else _expert_groups(recs, getattr(info, "stand_ins", ()))
    for r in items:
        if isinstance(r, list):      # a mixture-of-experts projection, its experts in one row
            shown = [x for x in r if all_layers or x.factorized]
            if shown:
                head = r[0].name.rpartition(".")[0]
                rows.append(_group_row(head, shown, timed))
            continue
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
    from .passes.decompose import GROUPED_OFF
    recs = list(info.records().values())
    fact = [r for r in recs if r.factorized]
    grouped = [r for r in recs if r.decision == "skipped" and GROUPED_OFF in (r.reason or "")]
    return {
        "layers": len(recs),
        "factorized": len(fact),
        "reverted": sum(r.decision == "reverted" for r in recs),
        "skipped": sum(r.decision == "skipped" for r in recs),
        "grouped_kept": len(grouped),          # grouped convs the decompose_grouped=False default kept
        "grouped_kept_params": sum(r.params_before for r in grouped),
        "layer_params_before": sum(r.params_before for r in fact),
        "layer_params_after": sum(r.params_after for r in fact),
        "model_params_before": info.params_before,
        "model_params_after": info.params_after,
        "model_flops_before": info.flops_before,
        "model_flops_after": info.flops_after,
    }


def outside_layers(root: nn.Module, records, stand_ins=()) -> tuple[int, list]:
    """Parameters of `root` (the caller's model: a traced graph has lost the classes of the modules it
    traced through) outside every Conv/Linear layer (factorized or not), factor chain and module given a
    stand-in whose weights are layers (`stand_ins`: paths; a mixture-of-experts module's 3-D weights), each
    tensor counted once: (their total, [(module class, count, name of its largest tensor, its shape)] by
    count, largest first)."""
    from .factorize.chain import FactorChain
    from .factorize.modules import is_layer_like
    inside: set = set()
    stand_ins = set(stand_ins)
    for name, m in root.named_modules():
        if name in records or name in stand_ins or isinstance(m, FactorChain) or is_layer_like(m):
            inside.update(id(p) for p in m.parameters())
    counted: set = set()
    kinds: dict = defaultdict(lambda: [0, None, None, 0])   # class -> [count, example, shape, its numel]
    # a tensor with several owners counts for the deepest (the Embedding rather than a parent's alias)
    for name, m in sorted(root.named_modules(), key=lambda nm: -nm[0].count(".") - bool(nm[0])):
        for pname, p in m.named_parameters(recurse=False):
            if id(p) in inside or id(p) in counted:
                continue
            counted.add(id(p))
            k = kinds[type(m).__name__]
            k[0] += p.numel()
            if p.numel() > k[3]:
                k[1:] = [f"{name}.{pname}" if name else pname, list(p.shape), p.numel()]
    rows = sorted(((cls, n, ex, shape) for cls, (n, ex, shape, _) in kinds.items() if n), key=lambda r: -r[1])
    return sum(r[1] for r in rows), rows


def describe_outside(rows: list, total: int, top: int) -> str:
    """'MixtralExperts 79%, 3-D weights; Embedding 5%' for the first `top` of outside_layers' rows."""
    return "; ".join(f"{cls} {_share(count, total)}" + (", 3-D weights" if len(shape) == 3 else "")
                     for cls, count, _, shape in rows[:top])


def _share(n: int, total: int) -> str:
    return f"{n / total:.0%}" if n >= 0.005 * total else "<1%"


def _outside_lines(outside, total: int) -> tuple[list, list]:
    """The summary row and (when they are OUTSIDE_SHARE of the model or more) the by-kind lines for the
    parameters no Conv/Linear layer holds (`outside_layers`' result): these are never factorized."""
    n, rows = outside if outside else (0, [])
    if not n or not total:
        return [], []
    row = ["params outside Conv/Linear layers", f"{n:,}", f"{_share(n, total)} of the original model, left as they are"]
    if n < OUTSIDE_SHARE * total:
        return [row], []
    lines = ["", "Parameters outside Conv/Linear layers, by module type (not factorized):"]
    for cls, count, ex, shape in rows[:TOP_KINDS]:
        extra = "; 3-D weights are not factorized" if len(shape) == 3 else ""
        lines.append(f"  {cls}: {count:,} ({_share(count, total)}), largest {ex} {_shape(shape)}{extra}")
    if len(rows) > TOP_KINDS:
        rest = sum(r[1] for r in rows[TOP_KINDS:])
        lines.append(f"  {len(rows) - TOP_KINDS} other module types: {rest:,}")
    return [row], lines


def _x(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def summary(info) -> str:
    t = totals(info)
    rows = [
        ["Conv/Linear layers", t["layers"], f"{t['factorized']} factorized, {t['reverted']} reverted, "
                                           f"{t['skipped']} skipped"],
    ]
    if t["grouped_kept"]:
        rows.append(["grouped convs kept", f"{t['grouped_kept']} ({t['grouped_kept_params']:,} params)",
                     "decompose_grouped=True factorizes them"])
    rows += [
        ["params in factorized layers", f"{t['layer_params_before']:,} -> {t['layer_params_after']:,}",
         _x(t["layer_params_before"], t["layer_params_after"]) + " fewer"],
        ["params, whole model", f"{t['model_params_before']:,} -> {t['model_params_after']:,}",
         _x(t["model_params_before"], t["model_params_after"]) + " fewer"],
    ]
    outside_row, outside_lines = _outside_lines(getattr(info, "outside", None), t["model_params_before"])
    rows += outside_row
    if t["model_flops_before"] and t["model_flops_after"] is not None:
        rows.append(["GFLOPs per forward (example inputs)",
                     f"{t['model_flops_before'] / 1e9:.3f} -> {t['model_flops_after'] / 1e9:.3f}",
                     _x(t["model_flops_before"], t["model_flops_after"]) + " fewer"])
    elif t["model_flops_before"] is None or t["model_flops_after"] is None:
        rows.append(["GFLOPs per forward (example inputs)", "unknown", "torch's FLOP counter failed (see note)"])
    if info.pass_times:
        rows.append(["pass times", ", ".join(f"{k} {v:.2f}s" for k, v in info.pass_times.items()), ""])
    out = tabulate(rows, tablefmt="plain")
    if outside_lines:
        out += "\n" + "\n".join(outside_lines)
    if info.fallback_parts:
        out += "\n\nParts traced separately (why):"
        for path, why in info.fallback_parts.items():
            out += f"\n  {path}: {why[:160]}"
    for note in info.notes:
        out += f"\n{note}"
    from .passes.check_speed import describe   # whole compiled model vs original, timed
    for line in describe(getattr(info, "whole_model", None)):
        out += f"\n{line}"
    return out
