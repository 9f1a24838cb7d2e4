"""Independent float64 NumPy reference implementations of every optimizer optserve serves.

Written from docs/optimizer-catalogue.md, never calling optax or jax.  Entry point:

    from tests.reference import reference_for
    opt = reference_for({"flux:ADAM": {"learning_rate": 0.01}})
    trajectory = opt.run(params, grads)       # params after each step, float64

Modules: ``core`` (trees, transforms, spec interpretation), ``schedules``, ``optax_rules``
(canonical rules), ``flux``, ``axon`` (also ``polaris:``), ``objax``; ``cases`` is the
conformance case list, ``data`` the shared test data and error metric.  ``optax_equiv`` (which
does import optax) builds the in-process optax counterpart of a canonical spec for comparisons.
"""

from . import axon, flux, objax, optax_rules  # noqa: F401 - imported to register their rules
from .core import Chain, ReferenceOptimizer, SpecError, Transform, apply_updates, build, known_rules, reference_for
from .objax import ParamsEMA

__all__ = [
    "Chain",
    "ParamsEMA",
    "ReferenceOptimizer",
    "SpecError",
    "Transform",
    "apply_updates",
    "build",
    "known_rules",
    "reference_for",
]
