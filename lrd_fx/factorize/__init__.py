"""Pure tensor math of low-rank decomposition: SVD, Tucker-2, rank rules, factor-chain builders."""
from .chain import FactorChain, materialize_, paused, pending_chain, pending_chains
from .modules import (chain_like, chain_params, effective_scheme, factorize, factorize_conv,
                      factorize_linear, factorize_many, factorize_workers, full_ranks, is_pointwise,
                      ranks_for_energy, ranks_for_ratio, ranks_for_vbmf, unsupported_reason)
from .ranks import (energy_rank, evbmf_rank, evbmf_rank_from_singular_values, svd_params,
                    svd_rank_for_ratio, tucker2_params, tucker2_ranks_energy, tucker2_ranks_for_ratio,
                    tucker2_ranks_vbmf)
from .svd import singular_values, svd_error, svd_split
from .tucker import tucker2, tucker2_error, tucker2_reconstruct, unfold

__all__ = [
    "FactorChain", "materialize_", "paused", "pending_chain", "pending_chains",
    "chain_like", "chain_params", "effective_scheme", "factorize", "factorize_conv", "factorize_linear",
    "factorize_many", "factorize_workers",
    "full_ranks", "is_pointwise", "ranks_for_energy", "ranks_for_ratio", "ranks_for_vbmf",
    "unsupported_reason",
    "energy_rank", "evbmf_rank", "evbmf_rank_from_singular_values", "svd_params", "svd_rank_for_ratio",
    "tucker2_params", "tucker2_ranks_energy", "tucker2_ranks_for_ratio", "tucker2_ranks_vbmf",
    "singular_values", "svd_error", "svd_split",
    "tucker2", "tucker2_error", "tucker2_reconstruct", "unfold",
]
