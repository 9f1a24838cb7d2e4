"""Hyperparameter types: validation of JSON values and their documentation.

Every rule declares a table of :class:`HP` entries. Each entry names a type
(:class:`Number`, :class:`Integer`, ...) that checks a JSON value, returns its
normalized form, and describes itself for ``list_rules()`` and the generated
reference page. Numbers that the rule can take as a traced array (``traced``)
also accept a schedule spec and may be marked tunable.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from optserve.server.spec.errors import SpecError, join, show


class _Required:
    """Sentinel default of a hyperparameter that must be given."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()


def is_number(value: Any) -> bool:
    # bool is an int subclass in Python, but `true` is not a number in JSON.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(x: float) -> str:
    return repr(float(x)) if not float(x).is_integer() or abs(x) >= 1e16 else str(int(x))


@dataclasses.dataclass(frozen=True)
class Number:
    """A real number, optionally bounded; ``traced`` ones also take schedules.

    This type checks numbers only. Where a traced hyperparameter is given a
    schedule instead, the compiler parses it with ``schedules.parse_schedule``:
    schedules have hyperparameter tables of their own, so this module cannot
    depend on them.

    Attributes:
      lo, hi: bounds (None = unbounded).
      lo_open, hi_open: whether the bound itself is excluded.
      traced: the rule's builder accepts a jax scalar for it, so it may be a
        schedule or tunable. False for values used at init time or in Python
        control flow.
      nullable: JSON ``null`` is a valid value (optax's ``None``).
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    traced: bool = True
    nullable: bool = False

    def in_range(self, x: float) -> bool:
        below = self.lo is not None and (x < self.lo or (self.lo_open and x == self.lo))
        above = self.hi is not None and (x > self.hi or (self.hi_open and x == self.hi))
        return not (below or above)

    def range_text(self) -> str:
        lo, hi = self.lo, self.hi
        if lo is None:
            return "any finite number" if hi is None else f"{'<' if self.hi_open else '<='} {_fmt(hi)}"
        if hi is None:
            return f"{'>' if self.lo_open else '>='} {_fmt(lo)}"
        left = "(" if self.lo_open else "["
        right = ")" if self.hi_open else "]"
        return f"in {left}{_fmt(lo)}, {_fmt(hi)}{right}"

    def check_number(self, value: Any, field: str) -> float:
        if not is_number(value):
            raise SpecError(field, f"expected a number, got {show(value)}")
        x = float(value)
        if not math.isfinite(x):
            raise SpecError(field, f"expected a finite number, got {show(value)}")
        if not self.in_range(x):
            raise SpecError(field, f"must be {self.range_text()}, got {show(value)}")
        return x

    def check(self, value: Any, field: str) -> Any:
        """The number (or None, if nullable). A schedule given for a traced number
        never reaches this check: the compiler parses it (``compiler._check_value``)."""
        if value is None and self.nullable:
            return None
        if isinstance(value, dict) and not self.traced:
            raise SpecError(field, f"expected a number (this hyperparameter cannot be a schedule), got {show(value)}")
        return self.check_number(value, field)

    def describe(self) -> str:
        text = "number " + self.range_text() if self.lo is not None or self.hi is not None else "number"
        if self.traced:
            text += " or schedule"
        if self.nullable:
            text += " or null"
        return text


@dataclasses.dataclass(frozen=True)
class Integer:
    """An integer (JSON numbers with an integral value are accepted)."""

    lo: int | None = None
    hi: int | None = None

    def check(self, value: Any, field: str) -> int:
        if not is_number(value) or (isinstance(value, float) and not value.is_integer()):
            raise SpecError(field, f"expected an integer, got {show(value)}")
        x = int(value)
        if self.lo is not None and x < self.lo:
            raise SpecError(field, f"must be >= {self.lo}, got {show(value)}")
        if self.hi is not None and x > self.hi:
            raise SpecError(field, f"must be <= {self.hi}, got {show(value)}")
        return x

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"integer in [{self.lo}, {self.hi}]"
        if self.lo is not None:
            return f"integer >= {self.lo}"
        return "integer"


@dataclasses.dataclass(frozen=True)
class Boolean:
    """A JSON boolean."""

    def check(self, value: Any, field: str) -> bool:
        if not isinstance(value, bool):
            raise SpecError(field, f"expected true or false, got {show(value)}")
        return value

    def describe(self) -> str:
        return "boolean"


@dataclasses.dataclass(frozen=True)
class Choice:
    """One of a fixed set of strings (or null when ``None`` is an option)."""

    options: tuple

    def check(self, value: Any, field: str) -> Any:
        if value in self.options and not isinstance(value, bool):
            return value
        listed = ", ".join(show(o) for o in self.options)
        raise SpecError(field, f"expected one of {listed}, got {show(value)}")

    def describe(self) -> str:
        return "one of " + ", ".join(show(o) for o in self.options)


DTYPE = Choice((None, "float32", "bfloat16", "float16", "float64"))


@dataclasses.dataclass(frozen=True)
class Seed:
    """A PRNG seed: an integer in [0, 2**32)."""

    def check(self, value: Any, field: str) -> int:
        return Integer(0, 2**32 - 1).check(value, field)

    def describe(self) -> str:
        return "integer seed in [0, 2**32)"


@dataclasses.dataclass(frozen=True)
class Globs:
    """Leaf-path globs: a string or a list of strings (``!glob`` excludes)."""

    def check(self, value: Any, field: str) -> list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            raise SpecError(field, f"expected a glob or a non-empty list of globs, got {show(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip("!"):
                raise SpecError(join(field, f"[{i}]"), f"expected a glob string, got {show(item)}")
        return list(value)

    def describe(self) -> str:
        return "leaf-path glob or list of globs"


@dataclasses.dataclass(frozen=True)
class Custom:
    """A type with its own checker (used by schedules' structured arguments)."""

    checker: Callable[[Any, str], Any]
    text: str

    def check(self, value: Any, field: str) -> Any:
        return self.checker(value, field)

    def describe(self) -> str:
        return self.text


@dataclasses.dataclass(frozen=True)
class HP:
    """One hyperparameter of a rule: name, type, default and documentation."""

    name: str
    type: Any
    default: Any = REQUIRED
    doc: str = ""
    aliases: tuple = ()  # other accepted spellings, canonicalized to `name`

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def traced(self) -> bool:
        return isinstance(self.type, Number) and self.type.traced

    def replace(self, **changes: Any) -> HP:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "default": None if self.required else self.default,
            "required": self.required,
            "type": self.type.describe(),
            "tunable": self.traced,
            "doc": self.doc,
        }


# Shared hyperparameters, so that each rule entry stays one small table.
UNIT_OPEN = Number(0.0, 1.0, hi_open=True)
NONNEG = Number(0.0)

LEARNING_RATE = HP("learning_rate", NONNEG, REQUIRED, "step size α (number or schedule)")
B1 = HP("b1", UNIT_OPEN, 0.9, "decay rate of the first-moment EMA")
B2 = HP("b2", UNIT_OPEN, 0.999, "decay rate of the second-moment EMA")
EPS = HP("eps", NONNEG, 1e-8, "added to the denominator for numerical stability")
EPS_ROOT = HP("eps_root", NONNEG, 0.0, "added inside the square root of the denominator")
MU_DTYPE = HP("mu_dtype", DTYPE, None, "dtype of the first moment (null = params' dtype)")
NESTEROV = HP("nesterov", Boolean(), False, "use Nesterov momentum")
WEIGHT_DECAY = HP("weight_decay", NONNEG, 0.0, "weight-decay coefficient λ")
MOMENTUM_OPT = HP("momentum", Number(0.0, 1.0, nullable=True), None, "momentum decay μ (null = no momentum)")
DECAY = HP("decay", UNIT_OPEN, 0.9, "decay rate of the squared-gradient EMA")
INITIAL_SCALE = HP("initial_scale", Number(0.0, traced=False), 0.0, "initial value of the EMA")
SEED = HP("key", Seed(), REQUIRED, "PRNG seed (required: every noise source needs its own)")
