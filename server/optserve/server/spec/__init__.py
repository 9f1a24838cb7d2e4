"""The optimizer spec compiler: JSON specs -> jit-compiled optax update rules.

>>> compiled = compile_spec({"adam": {"learning_rate": 1e-3}}, ["w"])
>>> state = compiled.init(params)
>>> updates, state = compiled.update(grads, state, params)

See ``docs/optimizers.md`` (generated from the registry) for every rule.
"""

from optserve.server.spec.catalog import list_rules
from optserve.server.spec.compiler import (
    MAX_SPEC_DEPTH,
    CompiledOptimizer,
    OptimizerState,
    check_spec_depth,
    compile_spec,
)
from optserve.server.spec.errors import SpecError

__all__ = [
    "MAX_SPEC_DEPTH",
    "CompiledOptimizer",
    "OptimizerState",
    "SpecError",
    "check_spec_depth",
    "compile_spec",
    "list_rules",
]
