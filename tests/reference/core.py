"""Core of the float64 NumPy reference: trees, the transform protocol, chains, spec parsing.

A *tree* here is what the server holds: a flat ``dict`` from leaf path to ``np.ndarray``.
Every transform mirrors optax's ``GradientTransformation``:

    state = t.init(params)
    updates, state = t.update(updates, state, params)
    params = apply_updates(params, updates)            # p <- p + u  (optax sign, §Notation)

State is explicit (plain dicts/tuples of float64 arrays), nothing is hidden in closures apart
from hyperparameters.  Nothing in this package imports jax or optax: each rule is written from
docs/optimizer-catalogue.md (row numbers such as ``A3``/``F7``/``J1`` refer to its §1 table).

Spec data is the server's format (docs/optimizers.md, "Spec grammar"):
  ``{"adam": {"learning_rate": 1e-3}}``, ``"flux:ADAM"``, ``{"flux:ADAM": {...}}``,
  ``{"chain": [spec, ...]}``, schedules wherever a number is allowed.
Rules register themselves with :func:`rule`; :func:`build` interprets a spec.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

Tree = dict[str, np.ndarray]

REQUIRED = object()  # marker: a hyperparameter without default


class SpecError(ValueError):
    """The reference cannot interpret a spec (unknown rule / hyperparameter, missing value)."""


# --------------------------------------------------------------------------------------------
# trees


def tree_map(fn: Callable[..., np.ndarray], tree: Tree, *rest: Tree) -> Tree:
    return {k: fn(v, *(r[k] for r in rest)) for k, v in tree.items()}


def full_like(tree: Tree, value: float) -> Tree:
    return {k: np.full(np.shape(v), float(value), dtype=np.float64) for k, v in tree.items()}


def zeros_like(tree: Tree) -> Tree:
    return full_like(tree, 0.0)


def as_f64(tree: Mapping[str, Any]) -> Tree:
    return {k: np.asarray(v, dtype=np.float64) for k, v in tree.items()}


def apply_updates(params: Tree, updates: Tree) -> Tree:
    """p <- p + u (optax ``apply_updates``; Flux's ``p -= Δ`` is expressed as u = -Δ)."""
    return tree_map(lambda p, u: p + u, params, updates)


# --------------------------------------------------------------------------------------------
# transforms


class Transform:
    """One gradient transformation with explicit state (optax ``GradientTransformation``)."""

    def init(self, params: Tree) -> Any:
        return ()

    def update(self, updates: Tree, state: Any, params: Tree) -> tuple[Tree, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class Chain(Transform):
    """Apply each transform in order; the state is the tuple of member states (optax ``chain``,
    Polaris ``compose``, Flux ``Optimiser``)."""

    def __init__(self, *transforms: Transform):
        self.transforms = list(transforms)

    def init(self, params):
        return tuple(t.init(params) for t in self.transforms)

    def update(self, updates, state, params):
        new_state = []
        for t, s in zip(self.transforms, state, strict=True):
            updates, s = t.update(updates, s, params)
            new_state.append(s)
        return updates, tuple(new_state)


class ReferenceOptimizer:
    """A whole optimizer built from a spec: ``init``/``update`` plus a convenience ``run``."""

    def __init__(self, transform: Transform, spec: Any):
        self.transform = transform
        self.spec = spec

    def init(self, params: Mapping[str, Any]):
        return self.transform.init(as_f64(params))

    def update(self, grads: Mapping[str, Any], state, params: Mapping[str, Any]):
        return self.transform.update(as_f64(grads), state, as_f64(params))

    def run(self, params: Mapping[str, Any], grads_seq) -> list[Tree]:
        """Apply every gradient in ``grads_seq``; return the params after each step."""
        params = as_f64(params)
        state = self.transform.init(params)
        out = []
        for grads in grads_seq:
            updates, state = self.transform.update(as_f64(grads), state, params)
            params = apply_updates(params, updates)
            out.append(params)
        return out

    def __repr__(self) -> str:
        return f"ReferenceOptimizer({self.spec!r})"


# --------------------------------------------------------------------------------------------
# registry and spec interpretation

# name (lower case, with namespace for presets) -> builder(args, path) -> Transform
_RULES: dict[str, Callable[[Any, str], Transform]] = {}


def make_builder(fn: Callable[..., Transform], defaults: Mapping[str, Any]):
    """Wrap ``fn(**hyperparameters)`` into ``build(args, path)``, filling ``defaults``.

    Unknown hyperparameters and missing required ones raise :class:`SpecError`, so a typo in a
    test case cannot silently fall back to a default.
    """

    def build(args, path):
        if args is None:
            args = {}
        if not isinstance(args, Mapping):
            raise SpecError(f"{path}: expected an object of hyperparameters, got {args!r}")
        unknown = sorted(set(args) - set(defaults))
        if unknown:
            raise SpecError(f"{path}: unknown hyperparameter(s) {unknown}")
        kwargs = {}
        for key, default in defaults.items():
            if key in args:
                kwargs[key] = args[key]
            elif default is REQUIRED:
                raise SpecError(f"{path}.{key}: required")
            else:
                kwargs[key] = default
        return fn(**kwargs)

    build.defaults = dict(defaults)
    build.__doc__ = fn.__doc__
    return build


def rule(*names: str, **defaults: Any):
    """Register ``fn(**hyperparameters) -> Transform`` under ``names`` with these defaults."""

    def deco(fn):
        builder = make_builder(fn, defaults)
        for name in names:
            _register(name, builder)
        return fn

    return deco


def _register(name: str, builder: Callable[[Any, str], Transform]) -> None:
    key = name.lower()
    if key in _RULES:
        raise RuntimeError(f"reference rule {name!r} registered twice")
    _RULES[key] = builder


def register_builder(name: str, builder: Callable[[Any, str], Transform]) -> None:
    """Register a builder that takes the raw spec argument (e.g. the list of ``flux:Optimiser``)."""
    _register(name, builder)


def known_rules() -> list[str]:
    return sorted(_RULES)


def split_spec(spec: Any, path: str = "spec") -> tuple[str, Any]:
    """``"name"`` -> (name, None); ``{"name": args}`` -> (name, args)."""
    if isinstance(spec, str):
        return spec, None
    if isinstance(spec, Mapping) and len(spec) == 1:
        ((name, args),) = spec.items()
        return name, args
    raise SpecError(f"{path}: a spec is a rule name or an object with exactly one key, got {spec!r}")


def build(spec: Any, path: str = "spec") -> Transform:
    """Interpret one spec (rule, preset or chain) into a :class:`Transform`."""
    name, args = split_spec(spec, path)
    if name == "chain":
        if not isinstance(args, (list, tuple)):
            raise SpecError(f"{path}.chain: expected a list")
        return Chain(*(build(s, f"{path}.chain[{i}]") for i, s in enumerate(args)))
    builder = _RULES.get(name.lower())
    if builder is None:
        raise SpecError(f"{path}: unknown rule {name!r}")
    return builder(args, f"{path}.{name}")


def reference_for(spec: Any) -> ReferenceOptimizer:
    """The float64 NumPy reference for a spec, with each library's code defaults."""
    # The modules register their rules on import.
    from . import axon, flux, objax, optax_rules  # noqa: F401 - here, not at the top: they import this module

    return ReferenceOptimizer(build(spec), spec)


# --------------------------------------------------------------------------------------------
# small numerical helpers shared by the modules


def leaf_norm(x: np.ndarray) -> float:
    """L2 (Frobenius) norm of a whole leaf, any rank (optax ``safe_norm`` / objax norm flatten)."""
    return float(np.sqrt(np.sum(np.square(x))))


def bias_correction(moment: np.ndarray, decay: float, t: int) -> np.ndarray:
    """m / (1 - decay^t)  (optax ``tree.bias_correction``)."""
    return moment / (1.0 - decay**t)
