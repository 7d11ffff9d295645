"""Module calls in generated code without nn.Module.__getattr__.

fx writes a call of layer "features.0.0" as `getattr(getattr(self.features, "0"), "0")(x)`: every step
goes through nn.Module.__getattr__, a Python function, because submodules live in the `_modules` dict,
not in the instance's __dict__. Where Python overhead counts (small batches, launch-bound GPUs) that alone
made a traced MobileNetV3-small 0.89x the eager original on a CPU. The code transformer here rewrites
each such call to `self._modules["features"]._modules["0"]._modules["0"](x)`: the same module, read
from the same dict __getattr__ reads (so a layer replaced later is the one called), as plain dict
look-ups. It is registered on the graph's code generator (Graph.on_generate_code), so every later
recompile keeps it, deep copies too; pickled models are rebuilt by fx from the code and stay exact.
"""
from __future__ import annotations

import re

from .pipeline import graph_modules

# a call_module line as fx writes it: `name[: type] = <getattr( ...>self<.a | , "0")>...(`
_CALL = re.compile(r'^(\s*\w+(?:\s*:\s*[^=\n]+?)?\s*=\s*)((?:getattr\()*)self((?:\.[A-Za-z_]\w*|, "[^"\\]*"\))*)\(')
_STEP = re.compile(r'\.([A-Za-z_]\w*)|, "([^"\\]*)"\)')
MARK = "_lrd_fast_calls"      # set on a code generator that has the transformer


def rewrite_module_calls(body: list) -> list:
    """fx's body lines with every `self`-rooted module call read through `_modules` (other lines as they are)."""
    out = []
    for line in body:
        m = _CALL.match(line)
        if m:
            steps = [a or b for a, b in _STEP.findall(m.group(3))]
            # the getattr( prefixes must close exactly on the quoted steps: else it is not fx's form
            if steps and m.group(2).count("getattr(") == m.group(3).count(', "'):
                line = (m.group(1) + "self" + "".join(f'._modules["{s}"]' for s in steps) + "("
                        + line[m.end():])
        out.append(line)
    return out


def _chain(previous):
    def transform(body):
        return rewrite_module_calls(previous(body) if previous is not None else body)
    transform.previous = previous          # what plain_codegen_ puts back
    return transform


def plain_codegen_(graph) -> bool:
    """Take the rewrite off `graph`'s code generator (its earlier transformer, if any, stays): fx's own
    `getattr` form, which TorchScript compiles and `self._modules[...]` it does not. True if it was there."""
    codegen = getattr(graph, "_codegen", None)
    fn = getattr(codegen, "_body_transformer", None)
    if codegen is None or not getattr(codegen, MARK, False) or not hasattr(fn, "previous"):
        return False
    codegen._body_transformer = fn.previous
    setattr(codegen, MARK, False)
    return True


def fast_module_calls_(root) -> int:
    """Register the rewrite on every graph part of `root` and recompile them; returns how many parts got
    it. Parts that have it already, or a torch whose fx has no code hooks, are left as they are."""
    done = 0
    for _, part in graph_modules(root):
        codegen = getattr(part.graph, "_codegen", None)
        if codegen is None or getattr(codegen, MARK, False) or not hasattr(part.graph, "on_generate_code"):
            continue
        part.graph.on_generate_code(_chain)
        setattr(codegen, MARK, True)
        part.recompile()
        done += 1
    return done

