"""materialize: factorize every factor chain still pending, in one parallel call, so nothing is owed after it.

When a rank search or calibration follows, decompose installs pending chains (exact, factorized on
first use: lrd_fx/factorize/chain.py) instead of factorizing every layer at its estimated ranks;
search_ranks gives a layer whose ranks change a new pending chain and calibrate fills the chains it
fits. What is still pending here is factorized now, each layer once, at its final ranks.
"""
from __future__ import annotations

from ..context import CompileContext
from ..errors import PassError
from ..factorize.chain import materialize_, pending_chains
from ..pipeline import PassResult


def defers(ctx: CompileContext) -> bool:
    """Whether decompose leaves the factorization to later passes: a rank search or calibration
    follows (they change ranks or fit the factors themselves), and the weights do not come from a file.
    api.build_passes adds this pass on the same condition."""
    return (ctx.config.rank_search is not None or ctx.calibration is not None) and not ctx.empty_init


def materialize(ctx: CompileContext):
    """Factory of the materialize pass (a no-op, modified=False, when no chain is pending)."""

    def run(gm):
        filled = materialize_(gm, progress=ctx.config.progress)
        left = pending_chains(gm)
        if left:
            raise PassError(f"materialize: {len(left)} factor chain(s) still pending after filling "
                            f"({', '.join(n for n, _ in left[:6])}); this is a bug, please report it")
        return PassResult(gm, filled > 0)

    run.name = "materialize"
    run.requires = ("decompose",)
    return run
