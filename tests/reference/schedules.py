"""Schedules as data (docs/optimizer-catalogue.md §3.3, §2.2), evaluated in float64.

A schedule maps the count ``c = 0, 1, 2, ...`` (optax: the count *before* the increment, see
§Notation) to a number.  Every schedule spec accepts ``count_offset`` (default 0): the schedule
is evaluated at ``c + count_offset`` (Flux's ExpDecay/InvDecay count from 1, §4.11).

Spec forms: a bare number (constant), or ``{"<name>": {hyperparameters}}`` with names
constant, exponential_decay, inverse_time_decay, polynomial, linear, cosine_decay,
warmup_cosine_decay, piecewise_constant, join.  The optax spellings (``constant_schedule``,
``polynomial_schedule``, ``linear_schedule``, ``cosine_decay_schedule``,
``warmup_cosine_decay_schedule``, ``piecewise_constant_schedule``, ``join_schedules``) are
accepted as aliases.  Formulas follow optax 0.2.8 ``optax/schedules/_schedule.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from numbers import Real
from typing import Any

from .core import REQUIRED, SpecError, split_spec

Schedule = Callable[[int], float]

_SCHEDULES: dict[str, tuple[Callable[..., Schedule], dict[str, Any]]] = {}


def _schedule(*names: str, **defaults: Any):
    def deco(fn):
        for name in names:
            _SCHEDULES[name] = (fn, defaults)
        return fn

    return deco


@_schedule("constant", "constant_schedule", value=REQUIRED)
def constant(value: float) -> Schedule:
    """s(c) = value."""
    return lambda c: float(value)


@_schedule(
    "exponential_decay",
    init_value=REQUIRED,
    transition_steps=REQUIRED,
    decay_rate=REQUIRED,
    transition_begin=0,
    staircase=False,
    end_value=None,
)
def exponential_decay(init_value, transition_steps, decay_rate, transition_begin, staircase, end_value) -> Schedule:
    """d = c - transition_begin; p = d / transition_steps (floored if staircase);
    s = init if d <= 0 else init * decay_rate^p; then clipped at end_value from below when
    decay_rate < 1 (from above otherwise).  transition_steps <= 0 or decay_rate == 0 give the
    constant init_value; a negative transition_begin is treated as 0 (optax behaviour)."""
    if transition_steps <= 0 or decay_rate == 0:
        return lambda c: float(init_value)
    begin = max(transition_begin, 0)

    def s(c):
        d = c - begin
        p = d / transition_steps
        if staircase:
            p = math.floor(p)
        v = float(init_value) if d <= 0 else init_value * decay_rate**p
        if end_value is not None:
            v = max(v, end_value) if decay_rate < 1.0 else min(v, end_value)
        return float(v)

    return s


@_schedule("inverse_time_decay", init_value=REQUIRED, decay_rate=REQUIRED, transition_steps=1, staircase=False)
def inverse_time_decay(init_value, decay_rate, transition_steps, staircase) -> Schedule:
    """s(c) = init_value / (1 + decay_rate * p), p = c / transition_steps (floored if staircase).

    §2.2 defines only the Flux case, InvDecay(γ): s(c) = 1 / (1 + γ (c + 1)), which is this with
    init_value=1, decay_rate=γ, count_offset=1.  Decision (docs/optimizer-catalogue.md is silent on the general
    form): the Keras ``InverseTimeDecay`` parametrisation, names aligned with exponential_decay.
    """

    def s(c):
        p = c / transition_steps
        if staircase:
            p = math.floor(p)
        return float(init_value / (1.0 + decay_rate * p))

    return s


@_schedule(
    "polynomial",
    "polynomial_schedule",
    init_value=REQUIRED,
    end_value=REQUIRED,
    power=REQUIRED,
    transition_steps=REQUIRED,
    transition_begin=0,
)
def polynomial(init_value, end_value, power, transition_steps, transition_begin) -> Schedule:
    """k = clip(c - transition_begin, 0, T); s = (init - end) * (1 - k/T)^power + end."""
    if transition_steps <= 0:
        return lambda c: float(init_value)
    begin = max(transition_begin, 0)

    def s(c):
        k = min(max(c - begin, 0), transition_steps)
        frac = 1.0 - k / transition_steps
        return float((init_value - end_value) * frac**power + end_value)

    return s


@_schedule(
    "linear", "linear_schedule", init_value=REQUIRED, end_value=REQUIRED, transition_steps=REQUIRED, transition_begin=0
)
def linear(init_value, end_value, transition_steps, transition_begin) -> Schedule:
    """polynomial with power 1."""
    return polynomial(init_value, end_value, 1, transition_steps, transition_begin)


@_schedule("cosine_decay", "cosine_decay_schedule", init_value=REQUIRED, decay_steps=REQUIRED, alpha=0.0, exponent=1.0)
def cosine_decay(init_value, decay_steps, alpha, exponent) -> Schedule:
    """k = min(c, decay_steps); s = init * ((1 - alpha) * (½(1 + cos(π k / decay_steps)))^exponent
    + alpha)."""
    if not decay_steps > 0:
        raise SpecError("cosine_decay.decay_steps: must be positive")

    def s(c):
        k = min(c, decay_steps)
        cos = 0.5 * (1.0 + math.cos(math.pi * k / decay_steps))
        return float(init_value * ((1.0 - alpha) * cos**exponent + alpha))

    return s


@_schedule(
    "warmup_cosine_decay",
    "warmup_cosine_decay_schedule",
    init_value=REQUIRED,
    peak_value=REQUIRED,
    warmup_steps=REQUIRED,
    decay_steps=REQUIRED,
    end_value=0.0,
    exponent=1.0,
)
def warmup_cosine_decay(init_value, peak_value, warmup_steps, decay_steps, end_value, exponent) -> Schedule:
    """join([linear(init -> peak over warmup_steps),
     cosine_decay(peak, decay_steps - warmup_steps, alpha=end/peak, exponent)],
    boundaries=[warmup_steps]).  alpha = 0 when peak is 0."""
    alpha = 0.0 if peak_value == 0.0 else end_value / peak_value
    return _join(
        [
            linear(init_value, peak_value, warmup_steps, 0),
            cosine_decay(peak_value, decay_steps - warmup_steps, alpha, exponent),
        ],
        [warmup_steps],
    )


@_schedule("piecewise_constant", "piecewise_constant_schedule", init_value=REQUIRED, boundaries_and_scales=None)
def piecewise_constant(init_value, boundaries_and_scales) -> Schedule:
    """v = init; for each boundary b (ascending) with scale k: v *= k once c >= b.

    JSON object keys are strings, so ``{"30": 0.5}`` means boundary 30; a list of
    ``[boundary, scale]`` pairs is accepted as well (decision: both forms, same meaning)."""
    pairs = _boundary_pairs(boundaries_and_scales)

    def s(c):
        v = float(init_value)
        for b, k in pairs:
            if c >= b:
                v *= k
        return v

    return s


def _boundary_pairs(bs) -> list[tuple[int, float]]:
    if bs is None:
        return []
    items = bs.items() if isinstance(bs, Mapping) else bs
    return sorted((int(b), float(k)) for b, k in items)


def _join(schedules: list[Schedule], boundaries: list[int]) -> Schedule:
    def s(c):
        out = schedules[0](c)
        for b, sched in zip(boundaries, schedules[1:], strict=False):  # unchecked lengths, as in optax
            if c >= b:
                out = sched(c - b)
        return out

    return s


def _build_join(args: Mapping[str, Any], path: str) -> Schedule:
    """join: schedules[0](c), switching to schedules[i](c - boundaries[i-1]) once c >= that
    boundary (optax ``join_schedules``).  Members are schedule specs or numbers."""
    unknown = sorted(set(args) - {"schedules", "boundaries"})
    if unknown:
        raise SpecError(f"{path}: unknown hyperparameter(s) {unknown}")
    scheds = [as_schedule(s, f"{path}.schedules[{i}]") for i, s in enumerate(args["schedules"])]
    return _join(scheds, [int(b) for b in args["boundaries"]])


def as_schedule(value: Any, path: str = "schedule") -> Schedule:
    """A number or a schedule spec -> a function of the integer count."""
    if isinstance(value, bool):
        raise SpecError(f"{path}: expected a number or a schedule, got {value!r}")
    if isinstance(value, Real):
        v = float(value)
        return lambda c: v
    name, args = split_spec(value, path)
    args = dict(args or {})
    offset = int(args.pop("count_offset", 0))
    if name in ("join", "join_schedules"):
        base = _build_join(args, f"{path}.{name}")
    else:
        if name not in _SCHEDULES:
            raise SpecError(f"{path}: unknown schedule {name!r}")
        fn, defaults = _SCHEDULES[name]
        unknown = sorted(set(args) - set(defaults))
        if unknown:
            raise SpecError(f"{path}.{name}: unknown hyperparameter(s) {unknown}")
        kwargs = {}
        for k, d in defaults.items():
            if k in args:
                kwargs[k] = args[k]
            elif d is REQUIRED:
                raise SpecError(f"{path}.{name}.{k}: required")
            else:
                kwargs[k] = d
        base = fn(**kwargs)
    if offset:
        return lambda c: base(c + offset)
    return base


def is_constant(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)
