"""The catalogue: every rule a spec may name, the built-ins and the custom transforms.

Importing this module registers the built-in rules (:mod:`.builtins`). The
custom transforms of installed plugins (:mod:`.custom`) are loaded once, on
first use of the catalogue rather than at import: a plugin may import
``optserve.server.spec``, which must be fully initialised by then. The
compiler, ``list_rules()`` and the reference page read rules from here;
:mod:`.registry` is the table underneath.
"""

from __future__ import annotations

# builtins: imported for its registrations.
from optserve.server.spec import builtins, custom, registry  # noqa: F401
from optserve.server.spec.registry import KINDS, Rule

_custom_loaded = False


def _load_custom() -> None:
    """Loads the custom transforms, the first time only."""
    global _custom_loaded
    if _custom_loaded:
        return
    # Set first: a plugin that compiles a spec while it is being loaded must not load the plugins again.
    _custom_loaded = True
    custom.load_entry_points()


def lookup(name: str, field: str, kinds: tuple[str, ...] | None = None) -> Rule:
    """The rule for a name, or a SpecError suggesting the closest names."""
    _load_custom()
    return registry.lookup(name, field, kinds)


def all_rules() -> list[Rule]:
    """Every rule: the built-ins, then the custom transforms."""
    _load_custom()
    return registry.all_rules()


def list_rules() -> list[dict]:
    """Every rule, transform, schedule, preset and custom transform, as JSON."""
    order = {k: i for i, k in enumerate(KINDS)}
    rules = sorted(all_rules(), key=lambda r: (order[r.kind], r.library != "optax", r.name))
    return [r.to_json() for r in rules]
