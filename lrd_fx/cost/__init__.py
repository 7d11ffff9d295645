"""Cost model of the rank search: the timer, the SQLite timing cache and the choice rule."""
from .cache import TimingCache, cache_clear, cache_info, default_path
from .model import (COST_MODELS, OBJECTIVES, Choice, Frame, Option, beat_original, candidate_ranks, choose,
                    find_edges, frame, get_cost_model, model_for, plan_budget, refine_ranks, register_cost_model,
                    staircase, time_plus_error, window_bounds)
from .timer import (Measurement, Setting, layer_step, measure, measure_interleaved, measure_rounds, use_cost_fn,
                    use_fake_clock)

__all__ = [
    "TimingCache", "cache_clear", "cache_info", "default_path",
    "COST_MODELS", "OBJECTIVES", "Choice", "Frame", "Option", "beat_original", "candidate_ranks", "choose",
    "find_edges", "frame", "get_cost_model", "model_for", "plan_budget", "refine_ranks", "register_cost_model",
    "staircase", "time_plus_error", "window_bounds",
    "Measurement", "layer_step", "measure", "measure_interleaved", "measure_rounds", "use_cost_fn",
    "Setting", "use_fake_clock",
]
