"""PassResult, PassManager and its instruments (print graph, dump code, time passes)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch.fx as fx

from .errors import LRDError, PassError


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool


Pass = Callable[[fx.GraphModule], PassResult]


def pass_name(p) -> str:
    return getattr(p, "name", None) or getattr(p, "__name__", None) or type(p).__name__


class Instrument:
    """Hooks around each pass; instruments may print, passes never do."""

    def before_pass(self, name: str, gm: fx.GraphModule) -> None: ...
    def after_pass(self, name: str, result: PassResult) -> None: ...


class PrintAfterPass(Instrument):
    """Print the graph after every pass (`debug=True` or LRD_FX_DEBUG=1)."""

    def __init__(self, style: str = "code", stream=None):
        self.style = style
        self.stream = stream

    def after_pass(self, name, result):
        gm = result.graph_module
        tag = "modified" if result.modified else "unchanged"
        print(f"\n=== lrd_fx: graph after pass '{name}' ({tag}) ===", file=self.stream)
        if self.style == "tabular":
            print(format_tabular(gm.graph), file=self.stream)
        else:
            print(gm.code.strip(), file=self.stream)


class DumpAfterPass(Instrument):
    """Write each stage's code to <dump_dir>/<NN>_<pass>.py."""

    def __init__(self, dump_dir: str):
        self.dir = Path(dump_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def after_pass(self, name, result):
        self.count += 1
        path = self.dir / f"{self.count:02d}_{name}.py"
        path.write_text(f"# lrd_fx: graph after pass '{name}'\n" + result.graph_module.code)


class PassTimer(Instrument):
    """Wall time of each pass, in seconds, in run order."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self._t0 = 0.0

    def before_pass(self, name, gm):
        self._t0 = time.perf_counter()

    def after_pass(self, name, result):
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - self._t0


def format_tabular(graph: fx.Graph) -> str:
    """fx's tabular view, without requiring fx's optional tabulate import path."""
    from tabulate import tabulate
    rows = [[n.op, n.name, str(n.target), str(n.args), str(n.kwargs)] for n in graph.nodes]
    return tabulate(rows, headers=["opcode", "name", "target", "args", "kwargs"])


class PassManager:
    """Run passes in order; lint after each; name the failing pass and those before it."""

    def __init__(self, passes: Sequence[Pass], instruments: Sequence[Instrument] = (), lint: bool = True):
        self.passes = list(passes)
        self.instruments = list(instruments)
        self.lint = lint

    def run(self, gm: fx.GraphModule) -> PassResult:
        done: list[str] = []
        modified = False
        for p in self.passes:
            name = pass_name(p)
            for ins in self.instruments:
                ins.before_pass(name, gm)
            try:
                result = p(gm)
                if not isinstance(result, PassResult):
                    raise TypeError(f"pass returned {type(result).__name__}, expected PassResult")
                if self.lint:
                    result.graph_module.graph.lint()
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
            gm = result.graph_module
            modified = modified or result.modified
            done.append(name)
        return PassResult(gm, modified)


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
