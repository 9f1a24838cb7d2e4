"""Schedules as data: ``{"exponential_decay": {...}}`` wherever a number is.

Every schedule takes ``count_offset`` (default 0): the value at update count
``c`` (0, 1, ...) is ``schedule(c + count_offset)``. Flux's decays count from
1, so its presets use ``count_offset=1`` (docs/optimizer-catalogue.md §4.11).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import optax

from optserve.server.spec.errors import SpecError, join, show, suggest
from optserve.server.spec.hyperparams import HP, REQUIRED, Boolean, Custom, Integer, Number, is_number
from optserve.server.spec.registry import Rule, lookup, register

Schedule = Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class ScheduleValue:
    """A validated schedule spec: the rule, its normalized arguments."""

    rule: Rule
    args: dict

    def to_json(self) -> dict:
        return {self.rule.name: {k: _arg_json(v) for k, v in self.args.items()}}

    def build(self) -> Schedule:
        kwargs = {h.name: h.default for h in self.rule.hyperparams if not h.required}
        kwargs.update(self.args)
        offset = kwargs.pop("count_offset")
        fn = self.rule.build(**kwargs)
        if offset:
            return lambda count: fn(count + offset)
        return fn


def _arg_json(value: Any) -> Any:
    if isinstance(value, ScheduleValue):
        return value.to_json()
    if isinstance(value, list):
        return [_arg_json(v) for v in value]
    return value


def parse_schedule(spec: Any, field: str) -> ScheduleValue:
    """Validates ``{"name": {args}}`` (or a bare number, for join_schedules)."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SpecError(field, f"expected a number or a schedule {{name: arguments}}, got {show(spec)}")
    ((name, args),) = spec.items()
    sub = join(field, name)
    # The registry, not the catalogue: schedules are all built in (the compiler, which parses the
    # rule before its arguments, has loaded the catalogue by the time a schedule is parsed).
    rule = lookup(name, sub, kinds=("schedule",))
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise SpecError(sub, f"expected an object of schedule arguments, got {show(args)}")
    out = {}
    for key, value in args.items():
        hp = rule.hp(key)
        if hp is None:
            names = ", ".join(h.name for h in rule.hyperparams)
            raise SpecError(
                join(sub, key),
                f"unknown argument{suggest(key, [h.name for h in rule.hyperparams])} ({rule.name} takes: {names})",
            )
        out[key] = hp.type.check(value, join(sub, key))
    for hp in rule.hyperparams:
        if hp.required and hp.name not in out:
            raise SpecError(join(sub, hp.name), "required argument is missing")
    if rule.check is not None:
        rule.check(out, sub)
    return ScheduleValue(rule, out)


def schedule_or_number(value: Any, field: str) -> ScheduleValue:
    """A schedule spec; a bare number means constant_schedule."""
    if is_number(value):
        value = {"constant_schedule": {"value": value}}
    return parse_schedule(value, field)


def _check_schedule_list(value: Any, field: str) -> list:
    if not isinstance(value, list) or not value:
        raise SpecError(field, f"expected a non-empty list of schedules, got {show(value)}")
    return [schedule_or_number(v, join(field, f"[{i}]")) for i, v in enumerate(value)]


def _check_boundaries(value: Any, field: str) -> list:
    if not isinstance(value, list):
        raise SpecError(field, f"expected a list of integer steps, got {show(value)}")
    out = [Integer(0).check(v, join(field, f"[{i}]")) for i, v in enumerate(value)]
    if out != sorted(out):
        raise SpecError(field, f"boundaries must be increasing, got {show(value)}")
    return out


def _check_boundaries_and_scales(value: Any, field: str) -> dict:
    """``{"1000": 0.1, "2000": 0.5}`` (JSON keys are strings) or ``[[1000, 0.1], ...]``."""
    pairs: list[Sequence[Any]] = []
    if isinstance(value, list):
        for i, item in enumerate(value):
            if not (isinstance(item, list) and len(item) == 2):
                raise SpecError(join(field, f"[{i}]"), f"expected a [step, scale] pair, got {show(item)}")
            pairs.append(item)
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        raise SpecError(field, f"expected an object {{step: scale}}, got {show(value)}")
    out = {}
    for step, scale in pairs:
        sub = join(field, str(step))
        try:
            step_int = int(step)
            if str(step_int) != str(step).strip() and step != step_int:
                raise ValueError
        except (TypeError, ValueError):
            raise SpecError(sub, f"expected an integer step as key, got {show(step)}") from None
        if step_int < 0:
            raise SpecError(sub, f"step must be >= 0, got {step_int}")
        out[str(step_int)] = Number(0.0).check_number(scale, sub)
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def _inverse_time_decay(
    init_value: float, decay_rate: float, transition_steps: int = 1, staircase: bool = False
) -> Schedule:
    """v(c) = init_value / (1 + decay_rate · c / transition_steps) (⌊·⌋ if staircase).

    Not in optax 0.2.8 (docs/optimizer-catalogue.md §2.2); Flux InvDecay is this with
    init_value=1, decay_rate=γ, count_offset=1.
    """

    def schedule(count):
        p = jnp.asarray(count, jnp.float32) / transition_steps
        if staircase:
            p = jnp.floor(p)
        return init_value / (1.0 + decay_rate * p)

    return schedule


def _piecewise_constant(init_value: float, boundaries_and_scales: dict) -> Schedule:
    return optax.piecewise_constant_schedule(init_value, {int(k): v for k, v in boundaries_and_scales.items()})


def _check_join(args: dict, field: str) -> None:
    if len(args["boundaries"]) != len(args["schedules"]) - 1:
        raise SpecError(
            join(field, "boundaries"),
            f"expected {len(args['schedules']) - 1} boundaries for {len(args['schedules'])} schedules, "
            f"got {len(args['boundaries'])}",
        )


def _join(schedules: list, boundaries: list) -> Schedule:
    return optax.join_schedules([s.build() for s in schedules], boundaries)


_OFFSET = HP("count_offset", Integer(0), 0, "added to the update count before evaluating")
_VALUE = Number(traced=False)
_NONNEG = Number(0.0, traced=False)
_STEPS = Integer(1)


def _schedule(
    name: str,
    build: Callable,
    hps: list,
    doc: str,
    formula: str,
    equivalent: str,
    aliases: tuple = (),
    library: str = "optax",
    check: Any = None,
) -> None:
    register(
        Rule(
            name=name,
            kind="schedule",
            library=library,
            build=build,
            hyperparams=(*hps, _OFFSET),
            doc=doc,
            formula=formula,
            equivalent=equivalent,
            aliases=aliases,
            check=check,
        )
    )


_schedule(
    "constant_schedule",
    optax.constant_schedule,
    [HP("value", _VALUE, REQUIRED, "the constant")],
    "A constant value.",
    "v(c) = value",
    "optax.constant_schedule(value)",
    ("constant",),
)
_schedule(
    "exponential_decay",
    optax.exponential_decay,
    [
        HP("init_value", _VALUE, REQUIRED, "value at c = transition_begin"),
        HP("transition_steps", _STEPS, REQUIRED, "steps per decay_rate factor"),
        HP("decay_rate", Number(0.0, traced=False, lo_open=True), REQUIRED, "factor per transition_steps"),
        HP("transition_begin", Integer(0), 0, "steps before decay starts"),
        HP("staircase", Boolean(), False, "decay in discrete steps"),
        HP("end_value", Number(traced=False, nullable=True), None, "bound the decayed value (null = none)"),
    ],
    "Exponential decay.",
    "v(c) = init_value · decay_rate^((c − transition_begin)/transition_steps) (⌊·⌋ if staircase), clipped at end_value",
    "optax.exponential_decay(...)",
)
_schedule(
    "inverse_time_decay",
    _inverse_time_decay,
    [
        HP("init_value", _VALUE, REQUIRED, "value at c = 0"),
        HP("decay_rate", _NONNEG, REQUIRED, "γ"),
        HP("transition_steps", _STEPS, 1, "steps per unit of decay"),
        HP("staircase", Boolean(), False, "decay in discrete steps"),
    ],
    "Inverse-time decay (no optax 0.2.8 equivalent; Flux InvDecay).",
    "v(c) = init_value / (1 + decay_rate · c/transition_steps) (⌊c/transition_steps⌋ if staircase)",
    "none in optax 0.2.8 (custom, docs/optimizer-catalogue.md §2.2)",
    ("inverse_time",),
    library="optserve",
)
_schedule(
    "polynomial_schedule",
    optax.polynomial_schedule,
    [
        HP("init_value", _VALUE, REQUIRED, "start value"),
        HP("end_value", _VALUE, REQUIRED, "final value"),
        HP("power", _VALUE, REQUIRED, "polynomial power"),
        HP("transition_steps", _STEPS, REQUIRED, "steps from init_value to end_value"),
        HP("transition_begin", Integer(0), 0, "steps held at init_value first"),
    ],
    "Polynomial decay from init_value to end_value.",
    "v(c) = (init − end)·(1 − min(c − begin, steps)/steps)^power + end",
    "optax.polynomial_schedule(...)",
    ("polynomial",),
)
_schedule(
    "linear_schedule",
    optax.linear_schedule,
    [
        HP("init_value", _VALUE, REQUIRED, "start value"),
        HP("end_value", _VALUE, REQUIRED, "final value"),
        HP("transition_steps", _STEPS, REQUIRED, "steps from init_value to end_value"),
        HP("transition_begin", Integer(0), 0, "steps held at init_value first"),
    ],
    "Linear interpolation from init_value to end_value.",
    "polynomial_schedule with power = 1",
    "optax.linear_schedule(...)",
    ("linear",),
)
_schedule(
    "cosine_decay_schedule",
    optax.cosine_decay_schedule,
    [
        HP("init_value", _VALUE, REQUIRED, "start value"),
        HP("decay_steps", _STEPS, REQUIRED, "steps to decay over"),
        HP("alpha", _VALUE, 0.0, "final value as a fraction of init_value"),
        HP("exponent", _VALUE, 1.0, "power of the cosine factor"),
    ],
    "Cosine decay.",
    "v(c) = init·((1 − α)·(½(1 + cos(π·min(c, D)/D)))^exponent + α)",
    "optax.cosine_decay_schedule(...)",
    ("cosine_decay",),
)
_schedule(
    "warmup_cosine_decay_schedule",
    optax.warmup_cosine_decay_schedule,
    [
        HP("init_value", _VALUE, REQUIRED, "value at c = 0"),
        HP("peak_value", _VALUE, REQUIRED, "value after warmup"),
        HP("warmup_steps", Integer(0), REQUIRED, "linear warmup steps"),
        HP("decay_steps", _STEPS, REQUIRED, "total steps, warmup included"),
        HP("end_value", _VALUE, 0.0, "final value"),
        HP("exponent", _VALUE, 1.0, "power of the cosine factor"),
    ],
    "Linear warmup then cosine decay.",
    "join(linear(init → peak, warmup_steps), cosine(peak → end, decay_steps − warmup_steps))",
    "optax.warmup_cosine_decay_schedule(...)",
    ("warmup_cosine_decay",),
)
_schedule(
    "piecewise_constant_schedule",
    _piecewise_constant,
    [
        HP("init_value", _VALUE, REQUIRED, "value before the first boundary"),
        HP(
            "boundaries_and_scales",
            Custom(_check_boundaries_and_scales, "object {step: scale}"),
            {},
            "at each step, the value is multiplied by scale",
        ),
    ],
    "Piecewise constant, multiplied by a scale at each boundary.",
    "v(c) = init_value · Π_{b ≤ c} scale_b",
    "optax.piecewise_constant_schedule(...)",
    ("piecewise_constant",),
)
_schedule(
    "join_schedules",
    _join,
    [
        HP(
            "schedules",
            Custom(_check_schedule_list, "list of schedules (numbers are constants)"),
            REQUIRED,
            "the pieces",
        ),
        HP(
            "boundaries",
            Custom(_check_boundaries, "list of integer steps"),
            REQUIRED,
            "step at which each next piece starts (it sees c − boundary)",
        ),
    ],
    "Concatenates schedules.",
    "v(c) = schedules[i](c − boundaries[i−1]) for boundaries[i−1] ≤ c < boundaries[i]",
    "optax.join_schedules(...)",
    ("join",),
    check=_check_join,
)
