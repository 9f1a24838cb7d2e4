"""The declarative registry: one :class:`Rule` entry per name a spec may use.

A new rule is one call to :func:`register` with its name, an optax builder,
its hyperparameter table, a doc line and a formula. Preset names
(``flux:ADAM``) are stored lowercased and matched case-insensitively.

This module is only the table: the modules that fill it import it. The
catalogue of every rule a spec may name (the built-ins, then the custom
transforms of installed plugins) is :mod:`optserve.server.spec.catalog`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from optserve.server.spec.errors import SpecError, suggest
from optserve.server.spec.hyperparams import HP

KINDS = ("optimizer", "transform", "combinator", "schedule", "preset", "custom")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One registry entry.

    Attributes:
      name: the name specs use (lowercase for namespaced presets).
      kind: one of ``KINDS``.
      library: where the semantics come from (optax, flux, axon, polaris, objax,
        optserve, or a plugin's distribution name).
      build: ``(**hyperparams) -> optax.GradientTransformation`` (schedules:
        ``-> Callable[[count], value]``). Traced hyperparameters may arrive as
        jax scalars (tunable or scheduled), so builders must not branch on them.
      hyperparams: the table; order is the documented order.
      doc: one paragraph.
      formula: the update as implemented, in the notation of docs/optimizer-catalogue.md.
      equivalent: the optax expression (or library call) it matches.
      display_name: the library's own spelling (``flux:ADAM``).
      mask: how a ``mask`` argument is applied: None (not accepted), ``"wrap"``
        (``optax.masked`` around the rule: unmasked leaves pass through), or the
        builder's own keyword receiving the boolean mask (e.g. ``"mask"`` for
        adamw: the mask selects the leaves that are decayed).
      unsigned: for Flux presets, the builder of Flux's Δ (before the sign flip),
        used inside ``flux:Optimiser``.
      aliases: other accepted names (canonicalized to ``name``).
      schedules: hyperparameters the builder itself accepts as optax schedules
        (callables), e.g. optax's learning_rate. A schedule elsewhere makes the
        rule run under inject_hyperparams semantics (values held in the state).
      tunable: hyperparameters that are tunable unless the spec says otherwise
        (``polaris:scale_by_state``).
      absent: (name, explanation) for canonical hyperparameters a preset's
        library does not have, used in the error message.
      check: optional ``(args, field) -> None`` raising SpecError for
        constraints between arguments (``args`` holds only the given ones).
    """

    name: str
    kind: str
    library: str
    build: Callable[..., Any]
    hyperparams: tuple[HP, ...] = ()
    doc: str = ""
    formula: str = ""
    equivalent: str = ""
    display_name: str | None = None
    mask: str | None = None
    unsigned: Callable[..., Any] | None = None
    aliases: tuple[str, ...] = ()
    check: Callable[[dict, str], None] | None = None
    schedules: tuple[str, ...] = ()
    tunable: tuple[str, ...] = ()
    absent: tuple[tuple[str, str], ...] = ()

    def builder(self, unsigned: bool = False) -> Callable[..., Any]:
        """``build``; with ``unsigned``, Flux's Δ builder (ValueError if the rule has none)."""
        if not unsigned:
            return self.build
        if self.unsigned is None:
            raise ValueError(f"rule {self.name!r} has no unsigned (Flux Δ) builder")
        return self.unsigned

    def hp(self, name: str) -> HP | None:
        for h in self.hyperparams:
            if h.name == name or name in h.aliases:
                return h
        return None

    def to_json(self) -> dict:
        return {
            "name": self.display_name or self.name,
            "kind": self.kind,
            "library": self.library,
            "doc": self.doc,
            "formula": self.formula,
            "equivalent": self.equivalent,
            "hyperparams": [h.to_json() for h in self.hyperparams],
            "mask": self.mask is not None,
            "aliases": list(self.aliases),
        }


_RULES: dict[str, Rule] = {}
_ALIASES: dict[str, str] = {}


def register(rule: Rule) -> Rule:
    """Adds a rule; names (and aliases) must be new."""
    if rule.kind not in KINDS:
        raise ValueError(f"unknown kind {rule.kind!r}")
    for name in (rule.name, *rule.aliases):
        key = name.lower()
        if key in _RULES or key in _ALIASES:
            raise ValueError(f"rule {name!r} is already registered")
    _RULES[rule.name.lower()] = rule
    for alias in rule.aliases:
        _ALIASES[alias.lower()] = rule.name.lower()
    return rule


def unregister(name: str) -> None:
    """Removes a rule (used for custom transforms that are reloaded)."""
    rule = _RULES.pop(name.lower(), None)
    if rule is not None:
        for alias in rule.aliases:
            _ALIASES.pop(alias.lower(), None)


def find(name: str) -> Rule | None:
    """The registered rule for a name (case-insensitive), or None."""
    key = name.lower()
    return _RULES.get(_ALIASES.get(key, key))


def lookup(name: str, field: str, kinds: tuple[str, ...] | None = None) -> Rule:
    """The registered rule for a name, or a SpecError suggesting the closest names."""
    rule = find(name)
    if rule is not None and (kinds is None or rule.kind in kinds):
        return rule
    pool = [r.display_name or r.name for r in _RULES.values() if kinds is None or r.kind in kinds]
    what = "schedule" if kinds == ("schedule",) else "rule"
    if rule is not None:
        raise SpecError(field, f'"{name}" is a {rule.kind}, not a {what} usable here{suggest(name, pool)}')
    raise SpecError(field, f'unknown {what} "{name}"{suggest(name, pool)}')


def all_rules() -> list[Rule]:
    """Every registered rule, in registration order."""
    return list(_RULES.values())
