"""Sequential freezing: the grad_gate op, freezing schedules (registry) and the FreezeController."""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Config, Freeze
from .errors import FreezeError
from .factorize.chain import ROLE_CORE, ROLE_LAST
from .registry import Registry
from .trace import register_leaf_function

FREEZER_NAME = "lrd_freezer"     # attribute of the controller (root) and of its links (nested graphs)


# --- the gate ---------------------------------------------------------------------------------------

def grad_gate(weight: torch.Tensor, freezer: nn.Module, key: str) -> torch.Tensor:
    """`weight` when factor `key` is trainable now, else `weight.detach()`.

    A detached weight gets no gradient (no weight-gradient GEMM in backward: the saving) while the
    gradient with respect to the layer's input still flows. The decision is a Python bool read from
    the controller's current state, so torch.compile specializes on it and guards on the state.
    A frozen weight's `.grad` is reset to None: optimizer.zero_grad(set_to_none=False) leaves a zero
    tensor there from the epoch it trained in, and weight decay, momentum and Adam would move the
    weight by it (measured: tests/test_freezing.py); optimizers skip parameters whose grad is None.
    """
    if freezer.trainable(key):
        return weight
    if _reset_frozen_grad and weight.is_leaf and weight.grad is not None:   # non-leaf weights have no .grad
        weight.grad = None
    return weight.detach()


_reset_frozen_grad = True   # tests switch it off to measure what the reset prevents


register_leaf_function(grad_gate)   # re-tracing a gated graph keeps the gate as one node


# --- groups -----------------------------------------------------------------------------------------
# Every factor belongs to one of two sides. Side "B" is frozen in phase 0 of "sequential" (and by
# static freeze_group="core"); side "A" is frozen in phase 1 (and by static freeze_group="outer"):
#
#   chain scheme         side A (group name)          side B (group name)
#   tucker2              first + last  ("outer")      core  ("core")
#   svd / conv_svd       first         ("first")      last  ("last")

def factor_group(scheme: Optional[str], role: str) -> str:
    """The sequential-schedule group of a factor: "outer"/"core" (Tucker-2), "first"/"last" (SVD)."""
    if scheme == "tucker2":
        return "core" if role == ROLE_CORE else "outer"
    return role


def factor_side(scheme: Optional[str], role: str) -> str:
    """"B" for the Tucker-2 core and the SVD last factor, "A" for the others."""
    if scheme == "tucker2":
        return "B" if role == ROLE_CORE else "A"
    return "B" if role == ROLE_LAST else "A"


# --- schedules ----------------------------------------------------------------------------------------

class Schedule:
    """A freezing schedule: which factor is trainable in which epoch.

    Subclasses implement `trainable`; `state_epochs` lists one epoch per distinct state of the schedule
    (benchmarks average over them) or None when unknown (user callables).
    """

    name = "custom"

    def trainable(self, epoch: int, layer: str, role: str, scheme: Optional[str]) -> bool:
        raise NotImplementedError

    def __call__(self, epoch: int, layer: str, role: str) -> bool:
        # callable like a user schedule, so a Schedule instance is accepted as Config(freeze=...)
        return self.trainable(epoch, layer, role, None)

    def state_epochs(self) -> Optional[list[int]]:
        return None

    def phase(self, epoch: int) -> Optional[int]:
        """The schedule's own phase number for `epoch`, or None (the controller then numbers states)."""
        return None

    def describe(self) -> str:
        return self.name


class SequentialSchedule(Schedule):
    """The paper's schedule. phase = (epoch // period) % 2.

    phase 0 (epochs 0..period-1, 2*period..3*period-1, ...): side B frozen — Tucker-2 cores and SVD
    "last" factors; the Tucker-2 outer 1x1s and SVD "first" factors train.
    phase 1: side A frozen — Tucker-2 "first"+"last" and SVD "first"; cores and SVD "last" train.
    """

    name = "sequential"

    def __init__(self, period: int = 1):
        if not isinstance(period, int) or isinstance(period, bool) or period < 1:
            raise FreezeError(f"freeze_period={period!r} must be an int >= 1 (epochs per phase)")
        self.period = period

    def phase(self, epoch: int) -> int:
        return (epoch // self.period) % 2

    def trainable(self, epoch, layer, role, scheme):
        frozen_side = "B" if self.phase(epoch) == 0 else "A"
        return factor_side(scheme, role) != frozen_side

    def state_epochs(self):
        return [0, self.period]

    def describe(self):
        return (f"sequential (period={self.period}): phase=(epoch//{self.period})%2; phase 0 freezes "
                f"Tucker-2 cores + SVD 'last' factors, phase 1 freezes Tucker-2 'first'+'last' + SVD 'first'")


_STATIC_GROUPS = ("core", "outer", "first", "last")


class StaticSchedule(Schedule):
    """One group always frozen (the plain layer-freezing baseline).

    group "core": side B (Tucker-2 cores, SVD "last") = sequential's phase 0 forever;
    "outer": side A (Tucker-2 first+last, SVD "first") = sequential's phase 1 forever;
    "first"/"last": that role in every chain.
    """

    name = "static"

    def __init__(self, group: str = "core"):
        if group not in _STATIC_GROUPS:
            raise FreezeError(f"freeze_group={group!r} must be one of {list(_STATIC_GROUPS)}")
        self.group = group

    def phase(self, epoch):
        return 0

    def trainable(self, epoch, layer, role, scheme):
        if self.group == "core":
            return factor_side(scheme, role) != "B"
        if self.group == "outer":
            return factor_side(scheme, role) != "A"
        return role != self.group

    def state_epochs(self):
        return [0]

    def describe(self):
        return f"static: group {self.group!r} always frozen"


class CallableSchedule(Schedule):
    """A user function (epoch, layer_name, role) -> trainable (truthy)."""

    def __init__(self, fn: Callable[[int, str, str], Any]):
        self.fn = fn
        self.name = getattr(fn, "__name__", "callable")

    def trainable(self, epoch, layer, role, scheme):
        return bool(self.fn(epoch, layer, role))

    def describe(self):
        return f"callable {self.name}(epoch, layer, role)"


SCHEDULES: Registry[Callable[[Any], Schedule]] = Registry(
    "schedule", error=FreezeError,
    hint="register one with @lrd_fx.register_schedule('name') on a factory (options: lrd_fx.Freeze) -> Schedule, "
         "or pass a callable (epoch, layer_name, role) -> trainable")


def register_schedule(name: Optional[str] = None, factory=None):
    """Register a schedule factory `(options: lrd_fx.Freeze) -> Schedule` under `name` (decorator, or a call
    with factory); the factory reads options.period / options.group as it needs."""
    return SCHEDULES.register(name) if factory is None else SCHEDULES.register(name, factory)


@register_schedule("sequential")
def _sequential(options) -> Schedule:
    return SequentialSchedule(options.period)


@register_schedule("static")
def _static(options) -> Schedule:
    return StaticSchedule(options.group)


def schedule_names() -> list[str]:
    return SCHEDULES.names()


def _options(options) -> Freeze:
    """The period/group a named schedule is built with: a Freeze, a Config's freeze (or the defaults)."""
    if isinstance(options, Config):
        options = options.freeze
    return options if options is not None else Freeze()


def make_schedule(spec, config=None) -> Schedule:
    """A Schedule from a registered name (built with `config`: an lrd_fx.Freeze or a Config), a Schedule
    instance or a callable (epoch, layer, role)."""
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, str):
        return SCHEDULES.get(spec)(_options(config))   # FreezeError naming the known schedules
    if callable(spec):
        return CallableSchedule(spec)
    raise FreezeError(f"freeze={spec!r} must be a schedule name {schedule_names()}, a Schedule, or a "
                      f"callable (epoch, layer_name, role) -> trainable")


# --- the controller ---------------------------------------------------------------------------------

class FreezeController(nn.Module):
    """Holds the epoch counter (a buffer: saved in the state_dict) and the schedule; gates read it.

    The counter names the epoch being trained. Every distinct trainable/frozen pattern is interned
    once, and the gates read only the current pattern (a Python dict), so torch.compile guards on the
    schedule state, never on the epoch number: one (re)compilation per state, not per epoch.
    """

    def __init__(self, schedule: Schedule, factors: dict[str, tuple[str, str, Optional[str]]]):
        super().__init__()
        self.schedule = schedule
        # factor key (qualified module name, e.g. "layer1.0.conv1.core") -> (layer, role, scheme)
        self.factors = dict(factors)
        self.register_buffer("current_epoch", torch.zeros((), dtype=torch.long))
        self._states: dict[tuple, dict[str, bool]] = {}   # pattern -> the one dict object for it
        self._mask: dict[str, bool] = {}
        self._phase = 0
        self._apply_epoch(0)

    # the gate's only entry point: a dict lookup on Python state
    def trainable(self, key: str) -> bool:
        return self._mask[key]

    def _apply_epoch(self, epoch: int) -> None:
        try:
            pattern = tuple(bool(self.schedule.trainable(epoch, layer, role, scheme))
                            for layer, role, scheme in self.factors.values())
        except Exception as e:
            raise FreezeError(f"the freezing schedule {self.schedule.describe()} failed at epoch {epoch}: "
                              f"{type(e).__name__}: {e}") from e
        mask = self._states.get(pattern)
        if mask is None:
            mask = dict(zip(self.factors, pattern))
            self._states[pattern] = mask
        self._mask = mask
        own = self.schedule.phase(epoch)
        self._phase = own if own is not None else list(self._states).index(pattern)

    def set_epoch(self, epoch: int) -> None:
        """Make `epoch` the current epoch: the gates follow the schedule's state for it."""
        if isinstance(epoch, torch.Tensor):
            epoch = int(epoch.item())
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise FreezeError(f"set_epoch({epoch!r}): the epoch must be an int >= 0")
        self._apply_epoch(epoch)
        with torch.no_grad():
            self.current_epoch.fill_(epoch)

    def set_schedule(self, schedule) -> None:
        """Switch to another schedule (name, Schedule or callable); the epoch counter is kept, and a name
        is built with the options in use: the period of the last "sequential" schedule, the group of
        the last "static" one (set_schedule("sequential") after period 3 keeps period 3)."""
        # The controller does not keep the Config, so the options are read off the schedules it ran.
        opts = dict(getattr(self, "_schedule_options", {}))
        for attr in ("period", "group"):     # Freeze's fields, as the built-in schedules name them
            if hasattr(self.schedule, attr):
                opts[attr] = getattr(self.schedule, attr)
        new = make_schedule(schedule, Freeze(**opts))
        old, old_states = self.schedule, self._states
        self.schedule, self._states = new, {}
        try:
            self._apply_epoch(self.epoch)
        except FreezeError:
            self.schedule, self._states = old, old_states
            raise
        self._schedule_options = opts

    def step_epoch(self) -> int:
        """Advance to the next epoch; returns it."""
        self.set_epoch(self.epoch + 1)
        return self.epoch

    def epochs(self, end: int, start: Optional[int] = None) -> Iterator[int]:
        """`for epoch in freezer.epochs(n):` — sets each epoch from `start` (default: the current one,
        so a resumed run continues) up to `end` - 1 before yielding it. When the loop has run to its end,
        the counter is `end`, the next epoch to run: a checkpoint saved after the loop, and a later
        `epochs(m)`, continue there (a loop left by `break` keeps the epoch it was in)."""
        first = e = self.epoch if start is None else start
        while e < end:
            self.set_epoch(e)
            yield e
            e += 1
        if e != first:              # ran to its end: the next epoch
            self.set_epoch(e)

    def trainer_callback(self):
        """A Hugging Face `transformers.TrainerCallback` that sets this controller's epoch at the start of
        training and of every epoch from the Trainer's own count (`state.epoch`, which a run resumed from a
        checkpoint restores): `Trainer(model=gm, ..., callbacks=[gm.lrd.freezer.trainer_callback()])`."""
        try:
            from transformers import TrainerCallback
        except ImportError as e:
            raise FreezeError("trainer_callback() is for transformers' Trainer, and transformers is not "
                              "installed; in your own loop use `for epoch in freezer.epochs(n)`") from e
        freezer = self

        class FreezeEpochCallback(TrainerCallback):
            """Sets the freezing gates' epoch from the Trainer's (lrd_fx.FreezeController.trainer_callback)."""

            def _set(self, state):
                # at an epoch's start state.epoch is the epochs done (a fraction when resumed mid-epoch)
                freezer.set_epoch(int(float(state.epoch or 0) + 1e-6))

            def on_train_begin(self, args, state, control, **kwargs):
                self._set(state)

            def on_epoch_begin(self, args, state, control, **kwargs):
                self._set(state)

        return FreezeEpochCallback()

    @property
    def epoch(self) -> int:
        return int(self.current_epoch.item())

    @property
    def phase(self) -> int:
        """The schedule's phase ("sequential": (epoch // period) % 2; "static": 0); for schedules without
        one, the index of the current trainable/frozen pattern in order of first use."""
        return self._phase

    def trainable_now(self) -> list[str]:
        """Qualified names of the factor layers whose weights train in the current epoch."""
        return [k for k, t in self._mask.items() if t]

    def frozen_now(self) -> list[str]:
        """Qualified names of the factor layers frozen in the current epoch."""
        return [k for k, t in self._mask.items() if not t]

    def state_epochs(self) -> Optional[list[int]]:
        """One epoch per distinct state of the schedule (None when the schedule cannot tell)."""
        return self.schedule.state_epochs()

    def sync_from_buffer(self) -> None:
        """Recompute the gates' Python state from the epoch buffer (done after load_state_dict)."""
        self._apply_epoch(self.epoch)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.sync_from_buffer()

    def extra_repr(self) -> str:
        n = len(self._mask)
        t = sum(self._mask.values())
        return f"schedule={self.schedule.describe()!r}, epoch={self.epoch}, trainable={t}/{n} factors"


class FreezerLink(nn.Module):
    """The controller as seen from a nested GraphModule: delegates without owning it.

    Keeping the controller out of `_modules` here stops its buffer from appearing twice in the
    state_dict; deep copies of the whole model still map the link onto the copied controller.
    """

    def __init__(self, controller: FreezeController):
        super().__init__()
        self.__dict__["controller"] = controller

    def trainable(self, key: str) -> bool:
        return self.controller._mask[key]     # found in __dict__: plain attribute lookup


# --- gated eager layers (factor chains inside parts the tracer left eager) ------------------------

class _GatedMixin:
    """Factor layers outside any graph: same parameters (state_dict unchanged), gated forward."""

    _lrd_key: str

    def _gated(self, t):
        return None if t is None else grad_gate(t, self._lrd_freezer, self._lrd_key)


class GatedLinear(_GatedMixin, nn.Linear):
    def forward(self, input):
        return F.linear(input, self._gated(self.weight), self._gated(self.bias))


class _GatedConvNd(_GatedMixin):
    def forward(self, input):
        return self._conv_forward(input, self._gated(self.weight), self._gated(self.bias))


class GatedConv1d(_GatedConvNd, nn.Conv1d):
    pass


class GatedConv2d(_GatedConvNd, nn.Conv2d):
    pass


class GatedConv3d(_GatedConvNd, nn.Conv3d):
    pass


_GATED = {nn.Linear: GatedLinear, nn.Conv1d: GatedConv1d, nn.Conv2d: GatedConv2d, nn.Conv3d: GatedConv3d}
_UNGATED = {v: k for k, v in _GATED.items()}


def gate_module_(module: nn.Module, controller: FreezeController, key: str) -> bool:
    """Turn a plain factor layer into its gated class in place; False when its type is not plain."""
    cls = _GATED.get(type(module))
    if cls is None:
        return False
    module.__class__ = cls
    module.__dict__["_lrd_freezer"] = controller
    module._lrd_key = key
    return True


def ungate_module_(module: nn.Module) -> None:
    cls = _UNGATED.get(type(module))
    if cls is not None:
        module.__class__ = cls
        module.__dict__.pop("_lrd_freezer", None)
        module.__dict__.pop("_lrd_key", None)


# --- lookups ----------------------------------------------------------------------------------------

def is_gated(model: nn.Module) -> bool:
    """True when the model carries freezing gates (a FreezeController)."""
    return any(isinstance(m, FreezeController) for m in model.modules())


def find_freezer(model: nn.Module) -> Optional[FreezeController]:
    """The model's FreezeController, or None when it has no gates."""
    for m in model.modules():
        if isinstance(m, FreezeController):
            return m
    return None
