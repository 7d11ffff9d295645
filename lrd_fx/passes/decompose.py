"""decompose: replace chosen Conv/Linear call_module nodes with their factor chains."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from ..context import CompileContext
from ..errors import FactorizationError, PassError, RankError
from ..factorize import modules as fm
from ..factorize import ranks as fr
from ..factorize.chain import FactorChain, pending_chain
from ..flops import chain_flops, layer_flops
from ..moe import is_expert_layer
from ..pipeline import PassResult, graph_modules
from ..plan import DECOMPOSED, LayerRecord
from ..trace import _FACTORIZABLE
from .materialize import defers

# Which layers can be factorized, their scheme and the rank rules are factorize/modules.py's
# (unsupported_reason, effective_scheme, full_ranks, ranks_for_*); FLOPs are flops.py's.


def weight_params(m: nn.Module) -> int:
    # parametrized / weight-normed / pruned layers keep their real tensors elsewhere: count what they own
    own = sum(p.numel() for p in m.parameters())
    return own if own else sum(p.numel() for p in (getattr(m, "weight", None), getattr(m, "bias", None))
                               if isinstance(p, torch.Tensor))


def _match(name: str, pattern: str) -> bool:
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def _ranks_for(name: str, m: nn.Module, scheme: str, cfg, per_layer: Optional[object], whitening=None) -> tuple:
    """Ranks in data-flow order (SVD: (r,), Tucker-2: (r_in, r_out)) from the configured rule; the
    rules themselves are factorize/modules.py's ranks_for_* (calibrate.energy_ranks with calibration data)."""
    full = fm.full_ranks(m, scheme)
    rule = per_layer if per_layer is not None else cfg.rank
    if rule == "full":
        return tuple(full)
    if isinstance(rule, int):
        ranks = (rule,) * len(full)
    elif isinstance(rule, tuple):
        ranks = rule
    elif rule == "vbmf":
        ranks = fm.ranks_for_vbmf(m, scheme, name=name)
    elif cfg.energy is not None and whitening is not None:   # calibration data: energy of the outputs
        from .calibrate import energy_ranks
        ranks = energy_ranks(m, scheme, whitening, cfg.energy, name=name)
    elif cfg.energy is not None:
        ranks = fm.ranks_for_energy(m, scheme, cfg.energy, name=name)
    else:
        ranks = fm.ranks_for_ratio(m, scheme, cfg.ratio)
    if len(ranks) != len(full):
        raise RankError(f"layer '{name}' ({scheme}) takes {len(full)} rank(s) "
                        f"{'(r_in, r_out)' if scheme == 'tucker2' else '(r,)'}, got {ranks}")
    return tuple(int(r) for r in ranks)


class _Site:
    def __init__(self, module):
        self.module = module
        self.nodes: list[tuple[fx.GraphModule, fx.Node, str]] = []   # (graph module, node, prefix)
        self.eager: list[tuple[nn.Module, str]] = []                  # (parent, attribute)


def collect_sites(gm: nn.Module, eager_parts) -> dict[str, _Site]:
    """Every Conv/Linear the model calls: graph call sites and layers inside eager (fallback) parts."""
    sites: dict[str, _Site] = {}
    for prefix, part in graph_modules(gm):
        for node in part.graph.nodes:
            if node.op != "call_module":
                continue
            m = part.get_submodule(node.target)
            if isinstance(m, _FACTORIZABLE):
                sites.setdefault(prefix + node.target, _Site(m)).nodes.append((part, node, prefix))
    for path in sorted(eager_parts):
        parent = gm.get_submodule(path) if path else gm
        if isinstance(parent, fx.GraphModule):
            continue
        for attr, child in parent.named_children():
            if isinstance(child, _FACTORIZABLE):
                name = f"{path}.{attr}" if path else attr
                sites.setdefault(name, _Site(child)).eager.append((parent, attr))
    return sites


GROUPED_OFF = "decompose_grouped=False"     # in the reason of every grouped conv skipped by that default


def _skip_reason(name: str, m: nn.Module, cfg, note: Optional[str] = None) -> Optional[str]:
    """Why layer `name` is left as it is (None: factorize it); `note` is a site-level reason
    (shared weight, never called as a layer) found by site_notes."""
    if any(_match(name, p) for p in cfg.skip):
        return "excluded by skip="
    if cfg.filter_fn is not None and not cfg.filter_fn(name, m):
        return "excluded by filter_fn"
    if fm.is_linear_like(m) and not cfg.decompose_linear:
        return "decompose_linear=False"
    if not fm.is_linear_like(m) and not cfg.decompose_conv:
        return "decompose_conv=False"
    why = fm.weight_reason(m)
    if why is not None:
        return why
    if note is not None:
        return note
    why = fm.unsupported_reason(m)   # overridden forward, groups: the factorizer's own rule
    if why is not None:
        return why
    out, inp, _ = fm.layer_dims(m)
    g = fm.groups_of(m)
    if min(out, inp) // g < cfg.min_channels:
        if g > 1:
            return (f"min(in, out) per group={min(out, inp) // g} < min_channels={cfg.min_channels} "
                    f"(groups={g}{', depthwise' if inp == g else ''})")
        return f"min(in, out)={min(out, inp)} < min_channels={cfg.min_channels}"
    if g > 1 and not cfg.decompose_grouped:
        return f"grouped conv (groups={g}): {GROUPED_OFF} (True factorizes each group)"
    return None


def site_notes(gm: nn.Module, sites: dict, layer_io: dict, ran: bool) -> dict[str, str]:
    """Site-level reasons to leave a layer as it is: its weight or bias is shared with another module
    (a factor chain for one user would untie them), or it sits directly in an eager part and was not
    called as a layer on the example inputs (`ran`), so its eager parent may read its weight itself."""
    owners: dict[int, list[str]] = {}
    for pname, p in gm.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    notes: dict[str, str] = {}
    for name, site in sites.items():
        m = site.module
        for attr in ("weight", "bias"):
            p = getattr(m, attr, None)
            others = [o.rpartition(".")[0] for o in owners.get(id(p), []) if o.rpartition(".")[0] != name]
            if isinstance(p, nn.Parameter) and others:
                try:
                    kind = type(gm.get_submodule(others[0])).__name__
                except AttributeError:
                    kind = "module"
                notes[name] = (f"weight shared with {others[0] or '<root>'} ({kind}"
                               f"{', as its ' + attr if attr != 'weight' else ''}): a factor chain would "
                               f"untie them; kept as is")
                break
        if name not in notes and ran and site.eager and not site.nodes and name not in layer_io \
                and not is_expert_layer(gm, name):
            notes[name] = ("not called as a layer on the example inputs (its eager parent may read its "
                           "weight directly): kept as is")
    return notes


_MHA_REASON = ("nn.MultiheadAttention reads its projection weights directly (F.multi_head_attention_forward), "
               "so they cannot be swapped for factor chains; kept as is")


def account_layers(gm: nn.Module, ctx: CompileContext) -> None:
    """Add a skipped record, with its reason, for every Conv/Linear-like layer of the caller's model
    that no call site covered (inside a leaf, read by get_attr, dropped by tracing, ConvTranspose,
    quantized, nn.MultiheadAttention projections), so the report accounts for every layer."""
    called: dict[str, str] = {}   # path of a module a graph calls whole -> its class name
    read: dict[str, str] = {}     # path of a tensor a graph reads with get_attr -> that graph's path
    for prefix, part in graph_modules(gm):
        for node in part.graph.nodes:
            if node.op == "call_module":
                called[prefix + node.target] = ""
            elif node.op == "get_attr":
                read[prefix + node.target] = prefix[:-1] or "<root>"
    layer_io = ctx.layer_io
    eager = set(ctx.eager_parts)
    stand_ins = set(ctx.stand_ins or ())
    for name, m in _layers_to_account(gm, ctx.model, stand_ins):
        if isinstance(m, nn.MultiheadAttention):
            key = f"{name}.in_proj" if name else "in_proj"
            if key not in ctx.records:
                ws = [m.in_proj_weight, m.in_proj_bias, m.q_proj_weight, m.k_proj_weight, m.v_proj_weight]
                n = sum(w.numel() for w in ws if isinstance(w, torch.Tensor))
                ctx.records[key] = LayerRecord(name=key, kind="MultiheadAttention.in_proj", reason=_MHA_REASON,
                                               params_before=n, params_after=n,
                                               fallback=_fallback_of(key, ctx.fallback_parts))
            continue
        if name in ctx.records:
            continue
        io = layer_io.get(name)
        flops = layer_flops(m, io) if isinstance(m, _FACTORIZABLE) else 0
        n = weight_params(m)
        ctx.records[name] = LayerRecord(
            name=name, kind=type(m).__name__,
            reason=_unreached_reason(name, m, gm, ctx.model, called, read, eager, stand_ins),
            in_shape=io["in"] if io else None, out_shape=io["out"] if io else None,
            params_before=n, params_after=n, flops_before=flops, flops_after=flops,
            fallback=_fallback_of(name, ctx.fallback_parts))


def _layers_to_account(gm: nn.Module, model: nn.Module, stand_ins: set):
    """(path, layer) of every Conv/Linear-like layer of the caller's model; for an nn.MultiheadAttention the
    compile's copy gave a stand-in (torch_modules), its input projection layers (in_proj, or q/k/v_proj
    where kdim/vdim differ) in place of its weights."""
    for name, m in model.named_modules():
        if not fm.is_layer_like(m):
            continue
        if isinstance(m, nn.MultiheadAttention) and name in stand_ins:
            e, bias = m.embed_dim, m.in_proj_bias is not None
            projections = ([("in_proj", e, 3 * e)] if m._qkv_same_embed_dim else
                           [("q_proj", e, e), ("k_proj", m.kdim, e), ("v_proj", m.vdim, e)])
            for proj, fan_in, fan_out in projections:
                path = f"{name}.{proj}"
                try:
                    layer = gm.get_submodule(path)
                except AttributeError:
                    layer = nn.Linear(fan_in, fan_out, bias=bias, device="meta")
                yield path, layer
            continue
        yield name, m


def _unreached_reason(name: str, m: nn.Module, gm: nn.Module, model: nn.Module, called: dict, read: dict,
                      eager: set, stand_ins: set = frozenset()) -> str:
    parts = name.split(".")
    ancestors = [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]   # nearest first
    if ancestors and ancestors[0] not in stand_ins and isinstance(model.get_submodule(ancestors[0]),
                                                                   nn.MultiheadAttention):
        return _MHA_REASON
    why = fm.unsupported_reason(m)
    if why is not None:
        return why
    if f"{name}.weight" in read:
        return (f"its weight is read directly by the traced forward of {read[f'{name}.weight']} (not called "
                f"as a layer), so it cannot be swapped for a factor chain")
    for anc in ancestors:
        if anc in called:
            return f"inside {anc} ({type(model.get_submodule(anc)).__name__}), which is kept as a leaf (not traced into)"
    try:
        gm.get_submodule(name)
    except AttributeError:
        return "not reached by the traced forward (unused, or on a branch the trace did not take)"
    for anc in ancestors:
        if anc.rpartition(".")[0] in eager or ("" in eager and "." not in anc):
            return f"inside {anc} ({type(model.get_submodule(anc)).__name__}), which is kept as a leaf / not traced"
    return "not called as a layer by the traced model"


def replace_call_sites(site: _Site, name: str, chain: nn.Module, rec: LayerRecord) -> None:
    """Install `chain` at the layer's path and rewire every call of the layer through it."""
    for part, node, prefix in site.nodes:
        target = node.target
        part.set_submodule(target, chain)
        if isinstance(chain, FactorChain):
            cur = None
            with part.graph.inserting_before(node):
                for role in chain.roles():
                    args = node.args if cur is None else (cur,)
                    kwargs = node.kwargs if cur is None else {}
                    new = part.graph.call_module(f"{target}.{role}", args, kwargs)
                    new.meta["lrd"] = rec
                    new.meta["lrd_role"] = role
                    cur = new
            for key in ("tensor_meta", "lrd_io"):
                if key in node.meta:
                    cur.meta[key] = node.meta[key]
            node.replace_all_uses_with(cur)
            part.graph.erase_node(node)
        else:
            node.meta["lrd"] = rec
    for parent, attr in site.eager:
        setattr(parent, attr, chain)


@dataclass
class _Job:
    """One layer to factorize: where it is called, its ranks (data-flow order) and its record."""
    name: str
    site: _Site
    ranks: tuple
    scheme: str
    rec: LayerRecord
    override: object = None      # the per-layer rank (rank={pattern: r}) that applied, if any


@dataclass
class _Kept:
    """A layer left as it is; `exceeded`: because a global rank=int is above its full rank."""
    reason: str
    exceeded: bool = False


def _override_of(name: str, per_layer: dict):
    override = None
    for pattern, r in per_layer.items():
        if _match(name, pattern):
            override = r   # the last matching pattern wins, like later dict entries
    return override


def _check_patterns(per_layer: dict, sites: dict) -> None:
    for pattern in per_layer:
        if not any(_match(n, pattern) for n in sites):
            some = ", ".join(list(sites)[:8]) + (" ..." if len(sites) > 8 else "")
            raise RankError(f"rank[{pattern!r}] matches no Conv/Linear layer of the model; "
                            f"layer names look like: {some}")


def kind_of(m: nn.Module) -> str:
    """The report's `kind` of a layer: its class, and a grouped conv's groups (its ranks count per group)."""
    g = fm.groups_of(m)
    return type(m).__name__ + (f"(groups={g})" if g > 1 else "")


def _new_record(name: str, m: nn.Module, ctx: CompileContext) -> LayerRecord:
    io = ctx.layer_io.get(name)
    return LayerRecord(name=name, kind=kind_of(m),
                       in_shape=io["in"] if io else None, out_shape=io["out"] if io else None,
                       params_before=weight_params(m), params_after=weight_params(m),
                       flops_before=layer_flops(m, io), flops_after=layer_flops(m, io),
                       fallback=_fallback_of(name, ctx.fallback_parts))


def _plan_layer(name: str, site: _Site, rec: LayerRecord, ctx: CompileContext, note: Optional[str],
                per_layer: dict, align: int):
    """A _Job factorizing layer `name` at the configured rule's ranks, or _Kept with the reason it stays."""
    cfg = ctx.config
    m = site.module
    reason = _skip_reason(name, m, cfg, note)
    if reason is not None:
        return _Kept(reason)
    override = _override_of(name, per_layer)
    scheme = fm.effective_scheme(m, cfg.conv_scheme)
    full = tuple(fm.full_ranks(m, scheme))
    rec.scheme, rec.full_ranks = scheme, list(full)
    if not ctx.empty_init and not fm.all_finite(m.weight.detach()):
        raise FactorizationError(
            f"layer '{name}' ({type(m).__name__}) has NaN/Inf in its weight; fix or re-initialise "
            f"the weights, or exclude the layer with skip=['{name}']")
    ranks = _ranks_for(name, m, scheme, cfg, override, _whitening(ctx, name))
    rec.estimate = list(ranks)
    if align > 1 and override is None and (cfg.rank is None or cfg.rank == "vbmf" or isinstance(cfg.rank, dict)):
        # a rule's estimate (ratio/energy/vbmf) goes to the hardware's rank unit; ranks the user
        # gave (rank=int, per-layer ranks, "full") stay as given
        ranks = tuple(fr.align_rank(r, align, f) for r, f in zip(ranks, full))
    if any(r < 1 for r in ranks):
        raise RankError(f"layer '{name}': rank {ranks} must be >= 1")
    if any(r > f for r, f in zip(ranks, full)):
        if isinstance(cfg.rank, int) and not isinstance(cfg.rank, bool) and override is None:
            return _Kept(f"rank {cfg.rank} exceeds full rank {list(full)}", exceeded=True)
        raise RankError(f"layer '{name}': rank {list(ranks)} exceeds its full rank {list(full)}; "
                        f"use at most {list(full)} (or rank='full')")
    after = fm.chain_params(m, ranks, scheme)
    if after >= rec.params_before and cfg.rank != "full" and override != "full" and not ctx.empty_init:
        return _Kept(f"no parameter saving at rank {list(ranks)} ({after} >= {rec.params_before})")
    return _Job(name, site, ranks, scheme, rec, override)


def _build_chains(jobs: list, ctx: CompileContext) -> dict:
    """{name: FactorChain} for every job. Factorized at once (spread over CPU threads), except: load()
    fills the weights from the file, and when a rank search or calibration follows the chains are
    pending (exact, factorized on first use): the search may change a layer's ranks and calibrate fits
    the factors to data, so each layer is factorized once, at its final ranks, by those passes or by
    the materialize pass after them."""
    if ctx.empty_init:
        return {j.name: fm.chain_like(j.site.module, j.ranks, j.scheme) for j in jobs}
    if defers(ctx):
        return {j.name: pending_chain(j.site.module, j.ranks, j.scheme, name=j.name) for j in jobs}
    return fm.factorize_many([(j.name, j.site.module, j.ranks, j.scheme) for j in jobs],
                             progress=ctx.config.progress)


def _install_job(job: _Job, chain: FactorChain, ctx: CompileContext, align: int) -> None:
    rec = job.rec
    ctx.originals[job.name] = job.site.module
    rec.ranks = list(job.ranks)
    rec.decision = DECOMPOSED
    rec.reason = _rule_text(ctx.config, job.override) + (
        f"; aligned to a multiple of {align} (align={ctx.config.align!r})" if rec.estimate != rec.ranks else "")
    rec.params_after = sum(p.numel() for p in chain.parameters())
    rec.flops_after = chain_flops(chain, ctx.layer_io.get(job.name))
    replace_call_sites(job.site, job.name, chain, rec)


def install_chain(gm: nn.Module, ctx: CompileContext, name: str, ranks: tuple, chain: FactorChain) -> None:
    """Put `chain` (layer `name` at `ranks`, usually pending: factorized later, once) in place of the layer's
    current chain and update its record (search_ranks and allocate change ranks this way)."""
    rec = ctx.records[name]
    current = gm.get_submodule(name)
    chain.train(current.training)
    if isinstance(current, FactorChain) and current.roles() != chain.roles():
        raise PassError(f"layer '{name}' changed factors {current.roles()} -> {chain.roles()}; "
                        f"this is a bug, please report it")
    gm.set_submodule(name, chain)
    rec.ranks = list(ranks)
    rec.params_after = sum(p.numel() for p in chain.parameters())
    rec.flops_after = chain_flops(chain, ctx.layer_io.get(name))


def decompose(ctx: CompileContext):
    """Factory of the decompose pass: ranks from the configured rule, factorization, graph rewrite."""
    cfg = ctx.config

    def run(gm):
        from ..cost.timer import setting_of
        align = setting_of(ctx).align      # Config.align; "auto": 8 on CUDA half precision, else 1
        sites = collect_sites(gm, ctx.eager_parts)
        notes = site_notes(gm, sites, ctx.layer_io, ctx.example_inputs is not None)
        per_layer = cfg.rank if isinstance(cfg.rank, dict) else {}
        _check_patterns(per_layer, sites)
        jobs, exceeded = [], 0
        for name, site in sites.items():
            rec = ctx.records[name] = _new_record(name, site.module, ctx)
            job = _plan_layer(name, site, rec, ctx, notes.get(name), per_layer, align)
            if isinstance(job, _Kept):
                rec.reason = job.reason
                exceeded += job.exceeded
                replace_call_sites(site, name, site.module, rec)
            else:
                jobs.append(job)
        chains = _build_chains(jobs, ctx)
        for job in jobs:
            _install_job(job, chains[job.name], ctx, align)
        if exceeded and not jobs:
            raise RankError(f"rank={cfg.rank} exceeds the full rank of every eligible layer; choose a smaller rank")
        _weight_reads(gm, ctx)
        account_layers(gm, ctx)
        return PassResult(gm, bool(jobs))   # the PassManager lints and recompiles every part

    run.name = "decompose"
    return run


def _weight_reads(gm: nn.Module, ctx: CompileContext) -> None:
    """Graph reads (get_attr) of a swapped layer's weight/bias: unused ones (left by tracing code such as
    T5's `self.wo.weight.dtype` checks) are dropped; used ones read FactorChain.weight, the product of
    the factors, computed on every forward: say so in the report."""
    for prefix, part in graph_modules(gm):
        for node in list(part.graph.nodes):
            if node.op != "get_attr":
                continue
            owner, _, attr = node.target.rpartition(".")
            try:
                mod = part.get_submodule(owner) if owner else part
            except AttributeError:
                continue
            if not isinstance(mod, FactorChain):
                continue
            if not node.users:
                part.graph.erase_node(node)
            elif attr == "weight":
                ctx.notes.append(f"decompose: graph {prefix[:-1] or '<root>'} reads '{prefix + node.target}' "
                                 f"of a factorized layer: it gets the product of the factors, computed on "
                                 f"every forward")


def _whitening(ctx: CompileContext, name: str):
    if ctx.calibration_stats is None:
        return None
    from .calibrate import whitening_of
    return whitening_of(ctx, name)


def _fallback_of(name: str, parts: dict) -> Optional[str]:
    for path in parts:
        if path == "<root>" or name == path or name.startswith(path + "."):
            return path
    return None


def _rule_text(cfg, override) -> str:
    if override is not None:
        return f"rank[...]={override}"
    if cfg.rank is not None and not isinstance(cfg.rank, dict):   # a dict's other layers follow energy/ratio
        return f"rank={cfg.rank}"
    if cfg.energy is not None:
        return f"energy={cfg.energy}"
    return f"ratio={cfg.ratio}"
