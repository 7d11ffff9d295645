"""Every user-facing failure of lrd_fx is an LRDError subclass defined here (and `warn`, for its warnings)."""
import os
import sys
import warnings

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(message: str, category=UserWarning) -> None:
    """warnings.warn attributed to the caller's line: the first frame outside lrd_fx (however many of
    lrd_fx's own frames, wrappers included, lie between)."""
    level, frame = 1, sys._getframe(0)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


class LRDError(Exception):
    """Base class of every error lrd_fx raises on purpose."""


class ConfigError(LRDError, ValueError):
    """An option has a bad value or an unknown name."""


class RankError(ConfigError):
    """A requested rank is invalid for a layer (below 1, above full rank, or naming no layer)."""


class InputError(LRDError, ValueError):
    """example_inputs do not fit the model (shape, dtype or device)."""


class TraceError(LRDError):
    """torch.fx could not trace (part of) the model."""


class FactorizationError(LRDError):
    """A weight could not be factorized (NaN/Inf, numerical failure)."""


class PassError(LRDError):
    """A graph pass failed; the message names the pass and the passes that ran before it."""


class CacheError(LRDError):
    """The timing cache could not be used."""


class FreezeError(LRDError):
    """The freezing schedule or controller was used wrongly."""


class LoadError(LRDError):
    """A file cannot be loaded: not an lrd_fx file, an unsafe (pickle) or newer format, damaged, or its plan
    does not fit the model it is loaded onto."""


class SaveError(LRDError):
    """A compiled model cannot be written (missing directory, unsaveable schedule or tensor)."""


class UnsupportedError(LRDError, NotImplementedError):
    """An operation the compiled model cannot do (e.g. transformers' resize_token_embeddings with a factorized
    LM head); the message says what to do instead."""
