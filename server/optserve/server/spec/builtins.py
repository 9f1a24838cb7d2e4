"""The built-in rules: importing this module registers every one of them.

Each module imported here registers its rules when it is imported; the order
does not show (``catalog.list_rules()`` and the reference page sort them).
"""

from optserve.server.spec import (  # noqa: F401
    lazy,
    presets_axon,
    presets_flux,
    presets_objax,
    rules_optax,
    schedules,
)
