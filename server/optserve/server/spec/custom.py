"""Custom transforms from the entry-point group ``optserve.transforms``.

A plugin distribution declares, in its pyproject.toml::

    [project.entry-points."optserve.transforms"]
    my_clip = "my_pkg.transforms:my_clip"

The entry point's name is the name specs use. It loads either

* a :class:`~optserve.server.spec.registry.Rule` (full control: hyperparameter
  table, doc, formula; its ``name`` is replaced by the entry point's), or
* a factory ``(**hyperparams) -> optax.GradientTransformation``: its keyword
  parameters become the hyperparameter table (parameters without a default are
  required; numeric defaults make numbers that may be scheduled or tunable;
  booleans, strings and None are fixed values), its docstring the doc.

Plugins run in the server process: they are trusted code installed by the
operator, never code sent over the wire. A plugin that fails to load, or whose
name is taken, is skipped with a warning so one bad plugin cannot take the
server down.

Plugins are loaded on first use of the catalogue (:mod:`.catalog`), not when
this module is imported: a plugin may itself import ``optserve.server.spec``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import logging
from collections.abc import Callable
from typing import Any

# builtins: imported for its registrations, so that a plugin cannot take a built-in's name.
from optserve.server.spec import builtins  # noqa: F401
from optserve.server.spec.hyperparams import HP, REQUIRED, Boolean, Number
from optserve.server.spec.registry import Rule, find, register, unregister

GROUP = "optserve.transforms"
log = logging.getLogger(__name__)

_loaded_names: list[str] = []


def rule_from_factory(name: str, factory: Callable[..., Any], library: str) -> Rule:
    """Derives a Rule from a factory's signature and docstring."""
    hps = []
    for p in inspect.signature(factory).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = REQUIRED if p.default is p.empty else p.default
        kind: Boolean | Number
        if isinstance(default, bool):
            kind = Boolean()
        elif default is REQUIRED or isinstance(default, (int, float)):
            kind = Number()
        elif default is None:
            kind = Number(nullable=True, traced=False)
        else:
            raise TypeError(f"parameter {p.name!r}: unsupported default {default!r}")
        hps.append(
            HP(p.name, kind, float(default) if isinstance(default, int) and not isinstance(default, bool) else default)
        )
    doc = inspect.getdoc(factory) or ""
    return Rule(
        name=name,
        kind="custom",
        library=library,
        build=factory,
        hyperparams=tuple(hps),
        doc=doc.split("\n\n")[0].replace("\n", " "),
        formula="",
        equivalent=f"{factory.__module__}.{factory.__qualname__}",
        mask="wrap",
    )


def load_entry_points() -> list[str]:
    """(Re)registers every transform of the entry-point group; returns their names."""
    for name in _loaded_names:
        unregister(name)
    _loaded_names.clear()
    for ep in importlib.metadata.entry_points(group=GROUP):
        dist = getattr(ep.dist, "name", None) or ep.module.split(".")[0]
        try:
            obj = ep.load()
            if isinstance(obj, Rule):
                rule = dataclasses.replace(obj, name=ep.name, kind="custom", display_name=None, aliases=())
            elif callable(obj):
                rule = rule_from_factory(ep.name, obj, dist)
            else:
                raise TypeError(f"expected a Rule or a factory, got {type(obj).__name__}")
            if find(ep.name) is not None:
                raise ValueError(f'the name "{ep.name}" is already taken by a built-in rule')
            register(rule)
            _loaded_names.append(rule.name.lower())
        except Exception as e:  # a broken plugin must not stop the server
            log.warning("skipping custom transform %r from %s: %s", ep.name, dist, e)
    return list(_loaded_names)
