"""compile_spec: JSON spec + leaf paths -> a validated, jittable optimizer.

Parsing validates everything up front (a bad spec fails at model creation,
never at the first push) and produces a tree of nodes. Building turns the tree
into one optax GradientTransformation. Tunable and scheduled hyperparameters
are *slots*: their values live in the optimizer state (as with
``optax.inject_hyperparams``), and the optax chain is rebuilt around them
inside each (traced) update, so changing one never recompiles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optserve.server.spec import catalog, masks, rng
from optserve.server.spec.errors import SpecError, join, show, suggest
from optserve.server.spec.hyperparams import HP, Globs, is_number
from optserve.server.spec.registry import Rule
from optserve.server.spec.schedules import Schedule, ScheduleValue, parse_schedule

# ------------------------------------------------------------------ the tree


@dataclasses.dataclass
class Slot:
    """A hyperparameter whose value lives in the state (tunable or scheduled)."""

    field: str  # full spec path, e.g. "chain[1].adamw.learning_rate"
    hp: HP
    value: float | None  # initial value of a tunable one
    schedule: Schedule | None  # the schedule of a scheduled one
    public: bool = True  # False: held in state only to mirror inject_hyperparams
    key: str = ""  # state key (public name), assigned once all slots are known


@dataclasses.dataclass
class RuleNode:
    """One rule or preset with its validated arguments."""

    rule: Rule
    field: str
    args: dict  # name -> constant | ScheduleValue | Slot
    given: dict  # canonical JSON of the arguments as given
    mask: dict | None = None  # leaf path -> bool
    unsigned: bool = False  # Flux Δ builder (inside flux:Optimiser)

    def build(self, hp: dict) -> optax.GradientTransformation:
        kwargs = {h.name: h.default for h in self.rule.hyperparams if not h.required}
        for name, value in self.args.items():
            if isinstance(value, Slot):
                value = hp[value.key]
            elif isinstance(value, ScheduleValue):
                value = value.build()
            kwargs[name] = value
        # The parser gives a mask only to rules that take one (rule.mask not None).
        if self.mask is not None and self.rule.mask is not None and self.rule.mask != "wrap":
            kwargs[self.rule.mask] = self.mask
        tx = self.rule.builder(self.unsigned)(**kwargs)
        if self.rule.name in rng.KEY_PER_LEAF:  # its key as key data: a state numpy can hold (spec/rng.py)
            tx = rng.key_data_state(tx)
        if self.mask is not None and self.rule.mask == "wrap":
            tx = optax.masked(tx, self.mask)
        return tx

    def to_json(self) -> Any:
        return {self.rule.name: self.given}


@dataclasses.dataclass
class ComboNode:
    """A combinator over child specs (chain, flux:Optimiser, polaris:compose)."""

    rule: Rule
    field: str
    children: list

    def build(self, hp: dict) -> optax.GradientTransformation:
        return self.rule.build(*[c.build(hp) for c in self.children])

    def to_json(self) -> Any:
        return {self.rule.name: [c.to_json() for c in self.children]}


@dataclasses.dataclass
class PartitionNode:
    """Leaf groups sent to different optimizers (optax.multi_transform)."""

    field: str
    groups: list  # [(globs, node)]
    labels: dict  # leaf path -> group label

    def build(self, hp: dict) -> optax.GradientTransformation:
        transforms = {str(i): node.build(hp) for i, (_, node) in enumerate(self.groups)}
        return optax.multi_transform(transforms, self.labels)

    def to_json(self) -> Any:
        return {"partition": [{"params": globs, "optimizer": node.to_json()} for globs, node in self.groups]}


Node = RuleNode | ComboNode | PartitionNode


# ------------------------------------------------------------------ parsing


class _Parser:
    """Validates a spec against the registry and the model's leaf paths."""

    def __init__(self, all_leaves: Sequence[str]):
        self.slots: list[Slot] = []
        self.all_leaves = list(all_leaves)

    def node(self, spec: Any, field: str, leaves: Sequence[str], unsigned: bool = False) -> Node:
        if isinstance(spec, str):
            name, args = spec, None
        elif isinstance(spec, dict) and len(spec) == 1:
            ((name, args),) = spec.items()
            if not isinstance(name, str):
                raise SpecError(field, f"expected a rule name as key, got {show(name)}")
        elif isinstance(spec, dict):
            keys = ", ".join(show(k) for k in spec) or "none"
            raise SpecError(field, f"expected exactly one rule name as key, got {len(spec)} ({keys})")
        else:
            raise SpecError(field, f"expected a rule name or an object {{rule: hyperparameters}}, got {show(spec)}")

        sub = join(field, name)
        if name.lower() == "partition":
            if unsigned:
                raise SpecError(sub, "a partition cannot be a member of flux:Optimiser")
            return self.partition(args, sub, leaves)
        rule = catalog.lookup(name, sub, kinds=("optimizer", "transform", "combinator", "preset", "custom"))
        if rule.kind == "combinator":
            return self.combo(rule, args, sub, leaves, unsigned)
        if unsigned and rule.unsigned is None:
            raise SpecError(sub, f'"{name}" is not a Flux rule; flux:Optimiser members must be flux: presets')
        return self.rule(rule, args, sub, leaves, unsigned)

    def combo(self, rule: Rule, args: Any, field: str, leaves: Sequence[str], unsigned: bool) -> ComboNode:
        if not isinstance(args, list):
            raise SpecError(field, f"expected a list of rules, got {show(args)}")
        # flux:Optimiser members are Flux Δ rules; other combinators keep the mode.
        child_unsigned = True if rule.unsigned is not None else unsigned
        if unsigned and rule.unsigned is None:
            raise SpecError(field, f'"{rule.name}" cannot be a member of flux:Optimiser')
        children = [self.node(c, join(field, f"[{i}]"), leaves, child_unsigned) for i, c in enumerate(args)]
        if unsigned:  # a nested flux:Optimiser inside another: no second sign flip
            return ComboNode(dataclasses.replace(rule, build=rule.builder(unsigned=True)), field, children)
        return ComboNode(rule, field, children)

    def partition(self, args: Any, field: str, leaves: Sequence[str]) -> PartitionNode:
        if not isinstance(args, list) or not args:
            raise SpecError(
                field, f'expected a non-empty list of {{"params": globs, "optimizer": spec}}, got {show(args)}'
            )
        labels: dict[str, str] = {}
        groups = []
        for i, group in enumerate(args):
            gfield = join(field, f"[{i}]")
            if not isinstance(group, dict) or set(group) != {"params", "optimizer"}:
                raise SpecError(gfield, f'expected {{"params": globs, "optimizer": spec}}, got {show(group)}')
            globs = Globs().check(group["params"], join(gfield, "params"))
            free = [leaf for leaf in leaves if leaf not in labels]
            try:
                chosen = masks.select(globs, free, join(gfield, "params"))
            except SpecError as e:
                if len(free) < len(leaves):
                    raise SpecError(e.field, e.message + " not already taken by an earlier group") from None
                raise
            mine = [leaf for leaf in leaves if leaf in chosen]
            for leaf in mine:
                labels[leaf] = str(i)
            node = self.node(group["optimizer"], join(gfield, "optimizer"), mine)
            groups.append((globs, node))
        missing = [leaf for leaf in leaves if leaf not in labels]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise SpecError(
                field, f'{len(missing)} leaves are in no group ({shown}); end with a group whose params are "**"'
            )
        return PartitionNode(field, groups, labels)

    def rule(self, rule: Rule, args: Any, field: str, leaves: Sequence[str], unsigned: bool) -> RuleNode:
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise SpecError(field, f"expected an object of hyperparameters, got {show(args)}")
        args = dict(args)
        tunable = args.pop("tunable", None)
        if tunable is None and rule.tunable:
            tunable = list(rule.tunable)
        mask_globs = args.pop("mask", None)

        values, given = {}, {}
        for key, value in args.items():
            hp = rule.hp(key) if isinstance(key, str) else None
            if hp is None:
                raise SpecError(join(field, str(key)), _unknown_hp(rule, str(key)))
            if hp.name in values:
                raise SpecError(join(field, key), f'"{key}" and "{hp.name}" name the same hyperparameter')
            values[hp.name] = _check_value(hp, value, join(field, key))
            given[hp.name] = _to_json(values[hp.name])
        for hp in rule.hyperparams:
            if hp.required and hp.name not in values:
                raise SpecError(join(field, hp.name), "required hyperparameter is missing")
        if rule.check is not None:
            rule.check(values, field)

        mask = None
        if mask_globs is not None:
            if rule.mask is None:
                raise SpecError(
                    join(field, "mask"),
                    f"{rule.display_name or rule.name} takes no mask "
                    '(use {"partition": [...]} to send leaf groups to different rules)',
                )
            globs = Globs().check(mask_globs, join(field, "mask"))
            chosen = masks.select(globs, leaves, join(field, "mask"))
            # Over every leaf of the model: inside a partition group optax still
            # hands the transform the whole tree (other groups' leaves masked out).
            mask = {leaf: leaf in chosen for leaf in self.all_leaves}
            given["mask"] = globs

        tunable_names = self.tunable(rule, tunable, values, field)
        if tunable_names:
            given["tunable"] = tunable_names
        table = {hp.name: hp for hp in rule.hyperparams}  # `values` is keyed by canonical names
        injected = bool(tunable_names) or any(
            isinstance(v, ScheduleValue) and table[k].traced and k not in rule.schedules for k, v in values.items()
        )
        if injected:
            # Semantics of optax.inject_hyperparams(rule): every numeric argument is
            # held in the state (tunable ones publicly), every schedule is evaluated
            # at the count. Holding all of them also keeps XLA from constant-folding
            # the others, so the trajectory matches inject_hyperparams bit for bit.
            for hp in rule.hyperparams:
                value = values.get(hp.name, hp.default)
                if not hp.traced:
                    continue
                if isinstance(value, ScheduleValue):
                    values[hp.name] = self.add(Slot(join(field, hp.name), hp, None, value.build()))
                elif is_number(value):
                    values[hp.name] = self.add(
                        Slot(join(field, hp.name), hp, float(value), None, public=hp.name in tunable_names)
                    )
        return RuleNode(rule, field, values, given, mask, unsigned)

    def tunable(self, rule: Rule, tunable: Any, values: dict, field: str) -> list:
        if tunable is None:
            return []
        tfield = join(field, "tunable")
        if isinstance(tunable, str):
            tunable = [tunable]
        if not isinstance(tunable, list):
            raise SpecError(tfield, f"expected a list of hyperparameter names, got {show(tunable)}")
        out = []
        for i, name in enumerate(tunable):
            ifield = join(tfield, f"[{i}]")
            hp = rule.hp(name) if isinstance(name, str) else None
            if hp is None:
                raise SpecError(ifield, _unknown_hp(rule, str(name)))
            name = hp.name
            if not hp.traced:
                raise SpecError(ifield, f'"{name}" cannot be tunable (it is fixed when the optimizer is built)')
            value = values.get(name, hp.default)
            if isinstance(value, ScheduleValue):
                raise SpecError(ifield, f'"{name}" is a schedule; a scheduled hyperparameter cannot also be tunable')
            if value is None:
                raise SpecError(ifield, f'"{name}" must be given a number to be tunable')
            if name not in out:
                out.append(name)
        return out

    def add(self, slot: Slot) -> Slot:
        self.slots.append(slot)
        return slot


def _check_value(hp: HP, value: Any, field: str) -> Any:
    """A rule argument: a schedule where a traced number is given an object, else what the type accepts."""
    if hp.traced and isinstance(value, dict):
        return parse_schedule(value, field)
    return hp.type.check(value, field)


def _unknown_hp(rule: Rule, key: str) -> str:
    names = [h.name for h in rule.hyperparams]
    extra = ["tunable"] + (["mask"] if rule.mask else [])
    takes = ", ".join(names + extra)
    display = rule.display_name or rule.name
    if rule.kind == "preset":
        note = dict(rule.absent).get(key)
        note = f"; {note}" if note else ""
        return f'{display} has no hyperparameter "{key}"{note}{suggest(key, names)} (it takes: {takes})'
    return f'unknown hyperparameter "{key}"{suggest(key, names + extra)} ({display} takes: {takes})'


def _to_json(value: Any) -> Any:
    if isinstance(value, ScheduleValue):
        return value.to_json()
    return value


def _assign_keys(slots: list[Slot]) -> None:
    """Public names: the bare hyperparameter name where unique, else the field path.

    Hidden slots are keyed by their field path.
    """
    counts: dict[str, int] = {}
    for s in slots:
        if s.public:
            counts[s.hp.name] = counts.get(s.hp.name, 0) + 1
    for s in slots:
        s.key = s.hp.name if s.public and counts[s.hp.name] == 1 else s.field


# ------------------------------------------------------------------ compiled


class OptimizerState(NamedTuple):
    """State of a compiled optimizer (the layout of optax.inject_hyperparams).

    Attributes:
      count: updates applied (int32, saturating); drives scheduled hyperparameters.
      hyperparams: public name -> current value (tunable and scheduled ones).
      inner_state: the optax chain's state.
    """

    # Shadows tuple.count on purpose: the field is optax.InjectHyperparamsState's.
    count: jax.Array  # type: ignore[assignment]
    hyperparams: dict
    inner_state: Any


def _hyperparam_dtype(tree: Any) -> Any:
    # Like inject_hyperparams, follow the parameters' precision, but never below
    # float32: a bf16 learning rate would round 3e-4 to 3.0e-4 ± 1e-6.
    dtypes = [x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.result_type(jnp.float32, *dtypes)


class CompiledOptimizer:
    """A validated spec, ready to init and update.

    ``update`` is pure and jittable; tunable hyperparameters are state, so
    ``set_hyperparams`` never recompiles.
    """

    def __init__(self, spec: Any, root: Node, slots: list[Slot], leaf_paths: Sequence[str]):
        self.spec = spec
        self.leaf_paths = list(leaf_paths)
        self.root = root  # the parsed tree (spec/packing.py reads and relabels it)
        self.slots = slots
        self._all = {s.key: s for s in slots}
        self._slots = {s.key: s for s in slots if s.public}
        self._by_field = {s.field: s for s in slots if s.public}
        # Without slots the chain does not depend on state values: build it once.
        self._static = root.build({}) if not slots else None

    def _inner(self, hp: dict) -> optax.GradientTransformation:
        return self._static if self._static is not None else self.root.build(hp)

    def _scheduled(self, count: jax.Array, dtype: Any) -> dict:
        return {k: jnp.asarray(s.schedule(count), dtype) for k, s in self._all.items() if s.schedule}

    def init(self, params: dict) -> OptimizerState:
        dtype = _hyperparam_dtype(params)
        count = jnp.zeros([], jnp.int32)
        hp = {k: jnp.asarray(s.value, dtype) for k, s in self._all.items() if s.schedule is None}
        hp.update(self._scheduled(count, dtype))
        return OptimizerState(count, hp, self._inner(hp).init(params))

    def update(self, grads: dict, state: OptimizerState, params: dict | None = None):
        dtype = _hyperparam_dtype(params if params is not None else grads)
        hp = dict(state.hyperparams)
        hp.update(self._scheduled(state.count, dtype))
        updates, inner = self._inner(hp).update(grads, state.inner_state, params)
        return updates, OptimizerState(optax.safe_increment(state.count), hp, inner)

    def hyperparams(self, state: OptimizerState) -> dict[str, float]:
        """Current values of tunable and scheduled hyperparameters (host floats)."""
        return {k: float(jax.device_get(state.hyperparams[k])) for k in self._slots}

    def set_hyperparams(self, state: OptimizerState, values: dict[str, float]) -> OptimizerState:
        """Returns a state with new tunable values (validated against the rule's range)."""
        new = dict(state.hyperparams)
        for name, value in values.items():
            slot = self._slots.get(name) or self._by_field.get(name)
            if slot is None:
                tunable = [k for k, s in self._slots.items() if s.schedule is None]
                listed = ", ".join(tunable) if tunable else 'none; mark them with "tunable": [...] in the spec'
                raise SpecError(
                    str(name), f"not a tunable hyperparameter{suggest(str(name), tunable)} (tunable: {listed})"
                )
            if slot.schedule is not None:
                raise SpecError(slot.key, f"follows a schedule ({slot.field}) and cannot be set")
            x = slot.hp.type.check_number(value, slot.key)
            new[slot.key] = jnp.asarray(x, dtype=new[slot.key].dtype)
        return state._replace(hyperparams=new)


# Deepest nesting of JSON arrays and objects a spec may have. Real specs stay below 20 (a chain in a
# partition in a chain, with schedules); parsing, building and printing a spec recurse once or twice
# per level, so a limit well inside Python's recursion limit keeps a hostile spec from ending in
# RecursionError (at ~400 levels) instead of a SpecError.
MAX_SPEC_DEPTH = 64


def check_spec_depth(spec: Any) -> None:
    """Raises SpecError if ``spec`` nests arrays and objects deeper than MAX_SPEC_DEPTH.

    Iterative, so that it is safe on any input.
    """
    stack = [(spec, 1)]
    while stack:
        value, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, (list, tuple)):
            children = value
        else:
            continue
        if depth > MAX_SPEC_DEPTH:
            raise SpecError("", f"nested deeper than {MAX_SPEC_DEPTH} levels of arrays and objects")
        stack.extend((child, depth + 1) for child in children)


def compile_spec(spec: Any, leaf_paths: Sequence[str]) -> CompiledOptimizer:
    """Validates ``spec`` for a model with these leaves and compiles it.

    Args:
      spec: JSON-compatible spec (see docs/optimizers.md, "Spec grammar").
      leaf_paths: the model's leaf paths, e.g. ``["encoder/kernel", ...]``.

    Returns:
      A CompiledOptimizer whose ``spec`` is the canonical form.

    Raises:
      SpecError: naming the field at fault.
    """
    check_spec_depth(spec)
    leaves = list(leaf_paths)
    parser = _Parser(leaves)
    root = parser.node(spec, "", leaves)
    _assign_keys(parser.slots)
    return CompiledOptimizer(root.to_json(), root, parser.slots, leaves)
