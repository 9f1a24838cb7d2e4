"""Imports every module that registers built-in rules (order = listing order)."""

import optax

from optserve.server.spec.registry import Rule, register

register(Rule(
    name="chain", kind="combinator", library="optax", build=optax.chain,
    doc='Applies transforms in order: {"chain": [spec, spec, ...]}.',
    formula="u = t_n(... t_2(t_1(g)))", equivalent="optax.chain(*transforms)"))

from optserve.server.spec import schedules  # noqa: E402,F401
from optserve.server.spec import rules_optax  # noqa: E402,F401
from optserve.server.spec import presets_flux  # noqa: E402,F401
from optserve.server.spec import presets_axon  # noqa: E402,F401
from optserve.server.spec import presets_objax  # noqa: E402,F401
