"""PassResult, PassManager and its instruments (print graph, dump code, time passes)."""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch.fx as fx
import torch.nn as nn

from .errors import LRDError, PassError


def training_flags(model: nn.Module) -> tuple:
    """Every module's own training flag, for restore_training_flags: `model.train(was)` would give every
    submodule the root's, and a BatchNorm the caller froze with .eval() in a training model would come
    back training and move its statistics."""
    return model, {m: m.training for m in model.modules()}


def restore_training_flags(flags: tuple) -> None:
    """Put back what training_flags saw; a module added since (a factor chain installed meanwhile) takes
    its parent's flag, as model.train(flag) would have given it."""
    model, known = flags

    def walk(m: nn.Module, parent: bool) -> None:
        m.training = known.get(m, parent)
        for c in m.children():
            walk(c, m.training)
    walk(model, known.get(model, model.training))


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """`model.eval()` for the block, then every module's own training flag back (training_flags)."""
    flags = training_flags(model)
    model.eval()
    try:
        yield model
    finally:
        restore_training_flags(flags)


@dataclass
class PassResult:
    graph_module: nn.Module   # the root: a GraphModule, or an eager module with traced parts inside
    modified: bool


Pass = Callable[[nn.Module], PassResult]


def pass_name(p) -> str:
    return getattr(p, "name", None) or getattr(p, "__name__", None) or type(p).__name__


def part_label(prefix: str, part: nn.Module) -> str:
    """How instruments and errors name a traced part: "root" or its module path, with its class."""
    name = prefix[:-1] if prefix else "root"
    return f"{name} ({type(part).__name__})"


class Instrument:
    """Hooks around each pass; instruments may print, passes never do."""

    def before_pass(self, name: str, root: nn.Module) -> None: ...
    def after_pass(self, name: str, result: PassResult) -> None: ...


def _eager_header(root: nn.Module) -> Optional[str]:
    if isinstance(root, fx.GraphModule):
        return None
    return (f"root {type(root).__name__} stays eager (its forward does not trace); "
            f"its traced parts follow")


class PrintAfterPass(Instrument):
    """Print every traced part's graph after every pass (`debug=True` or LRD_FX_DEBUG=1)."""

    def __init__(self, style: str = "code", stream=None):
        self.style = style
        self.stream = stream

    def after_pass(self, name, result):
        root = result.graph_module
        tag = "modified" if result.modified else "unchanged"
        parts = graph_modules(root)
        print(f"\n=== lrd_fx: graph after pass '{name}' ({tag}) ===", file=self.stream)
        header = _eager_header(root)
        if header:
            print(f"# {header}", file=self.stream)
        for prefix, part in parts:
            if len(parts) > 1 or prefix:
                print(f"--- part {part_label(prefix, part)} ---", file=self.stream)
            if self.style == "tabular":
                print(format_tabular(part.graph), file=self.stream)
            else:
                print(part.code.strip(), file=self.stream)


class DumpAfterPass(Instrument):
    """Write each stage's code to <dump_dir>/<NN>_<pass>.py, every traced part under its own header."""

    def __init__(self, dump_dir: str):
        self.dir = Path(dump_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def after_pass(self, name, result):
        self.count += 1
        root = result.graph_module
        path = self.dir / f"{self.count:02d}_{name}.py"
        text = f"# lrd_fx: graph after pass '{name}'\n"
        header = _eager_header(root)
        if header:
            text += f"# {header}\n"
        parts = graph_modules(root)
        for prefix, part in parts:
            if len(parts) > 1 or prefix:
                text += f"\n# --- part {part_label(prefix, part)} ---\n"
            text += part.code
        path.write_text(text)


class PassTimer(Instrument):
    """Wall time of each pass, in seconds, in run order."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self._t0 = 0.0

    def before_pass(self, name, root):
        self._t0 = time.perf_counter()

    def after_pass(self, name, result):
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - self._t0


def format_tabular(graph: fx.Graph) -> str:
    """fx's tabular view, without requiring fx's optional tabulate import path."""
    from tabulate import tabulate
    rows = [[n.op, n.name, str(n.target), str(n.args), str(n.kwargs)] for n in graph.nodes]
    return tabulate(rows, headers=["opcode", "name", "target", "args", "kwargs"])


class PassManager:
    """Run passes in order over a root that is a GraphModule or an eager module with traced parts.

    After each pass, every GraphModule part is linted and recompiled here (passes only edit graphs),
    as torch/fx/passes/infra/pass_manager.py does; a failure names the pass, the part and the passes
    run before it.
    """

    def __init__(self, passes: Sequence[Pass], instruments: Sequence[Instrument] = (), lint: bool = True):
        self.passes = list(passes)
        self.instruments = list(instruments)
        self.lint = lint

    def finish(self, root: nn.Module) -> None:
        """Lint (if enabled) and recompile every traced part of root."""
        for prefix, part in graph_modules(root):
            try:
                if self.lint:
                    part.graph.lint()
                part.recompile()
            except Exception as e:
                raise RuntimeError(f"traced part {part_label(prefix, part)} is invalid after the pass: "
                                   f"{type(e).__name__}: {e}") from e

    def run(self, root: nn.Module) -> PassResult:
        done: list[str] = []
        modified = False
        for p in self.passes:
            name = pass_name(p)
            missing = [r for r in getattr(p, "requires", ()) if r not in done]
            if missing:
                raise PassError(f"pass '{name}' requires {missing} to run before it (passes run so far: "
                                f"{done or 'none'}); build the pass list with lrd_fx.api.build_passes")
            for ins in self.instruments:
                ins.before_pass(name, root)
            try:
                result = p(root)
                if not isinstance(result, PassResult):
                    raise TypeError(f"pass returned {type(result).__name__}, expected PassResult")
                if not isinstance(result.graph_module, nn.Module):
                    raise TypeError(f"pass returned {type(result.graph_module).__name__} as its model, "
                                    f"expected an nn.Module")
                self.finish(result.graph_module)
            except KeyboardInterrupt:
                raise
            except LRDError as e:
                # already user-facing: add where it happened, keep the class
                if not getattr(e, "_lrd_pass_named", False):
                    e.args = (f"[pass '{name}', after {done or 'no passes'}] {e}",) + e.args[1:]
                    e._lrd_pass_named = True
                raise
            except Exception as e:
                raise PassError(
                    f"pass '{name}' failed (passes run before it: {done or 'none'}): "
                    f"{type(e).__name__}: {e}. Re-run with debug=True to print the graph after "
                    f"each pass, or dump_dir=... to save each stage's code.") from e
            for ins in self.instruments:
                ins.after_pass(name, result)
            root = result.graph_module
            modified = modified or result.modified
            done.append(name)
        return PassResult(root, modified)


def default_instruments(debug: bool, dump_dir: Optional[str]) -> list[Instrument]:
    ins: list[Instrument] = []
    if debug or os.environ.get("LRD_FX_DEBUG", "") not in ("", "0"):
        ins.append(PrintAfterPass(style=os.environ.get("LRD_FX_DEBUG_STYLE", "code")))
    if dump_dir:
        ins.append(DumpAfterPass(dump_dir))
    return ins


def graph_modules(root) -> list[tuple[str, fx.GraphModule]]:
    """Every GraphModule in root (root first), with its qualified-name prefix ("" or "a.b.").

    More than one exists when parts of a model were traced separately (the tracing fallback).
    Graph modules nested inside a traced graph's leaves are included; their own leaves are not
    walked again through the parent.
    """
    out = []
    for name, m in root.named_modules():
        if isinstance(m, fx.GraphModule):
            out.append((f"{name}." if name else "", m))
    return out
