"""Generates docs/optimizers.md from the registry.

    python -m optserve.server.spec.docs > docs/optimizers.md

A test regenerates the page and fails when the checked-in copy is stale.
Custom transforms (plugins) are installation-specific and are not included;
``optserve rules`` / the ListRules RPC list them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from typing import Any

from optserve.server.spec import catalog
from optserve.server.spec.hyperparams import HP
from optserve.server.spec.packing import packing_of
from optserve.server.spec.registry import Rule

INTRO = """\
# Optimizer reference

Generated from the spec registry by `python -m optserve.server.spec.docs > docs/optimizers.md`;
do not edit by hand (a test fails when this page is stale). Formulas, library differences and
sources: [docs/optimizer-catalogue.md](optimizer-catalogue.md). Notation: `g` the incoming update, `p` the
parameter, `t = 1, 2, ...` the update count (`c = t − 1` for schedules), `u` the emitted update
(`p ← p + u`); Flux rules are written with Flux's `Δ` (`u = −Δ`).

## Spec grammar

A spec is JSON data:

- a rule with hyperparameters: `{"adam": {"learning_rate": 0.001, "b1": 0.9}}`; a bare name
  `"flux:ADAM"` means all defaults;
- a chain: `{"chain": [spec, spec, ...]}`;
- a schedule wherever a hyperparameter says "or schedule":
  `{"learning_rate": {"exponential_decay": {"init_value": 1e-3, "transition_steps": 1000, "decay_rate": 0.1}}}`.
  Every schedule takes `count_offset` (the value at count `c` is `s(c + count_offset)`);
- presets of other libraries, `flux:`, `axon:`, `polaris:`, `objax:`, with that library's code
  defaults and semantics; names match case-insensitively, hyperparameters use the canonical
  (optax) names below, and a hyperparameter the library does not have is an error;
- `"tunable": ["learning_rate", ...]` on any rule: those hyperparameters live in the optimizer
  state and can be changed while training (`model.set_hyperparams(learning_rate=...)`), exactly as
  with `optax.inject_hyperparams`. The name is the bare hyperparameter name, or its field path
  (`chain[1].adamw.learning_rate`) when several rules have it;
- `"mask": globs` on rules marked *mask* below: leaf-path globs (`*` within a path component,
  `**` across components, `!glob` excludes, in order; `["**", "!**/bias", "!**/scale"]` = all but
  biases and norm scales). For adamw, lamb, lars, adadelta and add_decayed_weights the mask selects
  the decayed leaves; for other transforms the unmasked leaves pass through unchanged. A glob that
  matches no leaf is an error;
- a partition sending leaf groups to different optimizers (`optax.multi_transform`); the first
  group whose globs match a leaf takes it, and every leaf must be taken:
  `{"partition": [{"params": ["**/bias"], "optimizer": {"sgd": {"learning_rate": 0.1}}},
  {"params": "**", "optimizer": {"adam": {"learning_rate": 1e-3}}}]}`;
- custom transforms installed on the server (entry-point group `optserve.transforms`), by name.

## Packed layouts

The server holds the leaves that a spec treats alike in a few flat buffers and runs the rules on
the buffers (docs/design.md, "Packed layouts"). Each rule below says how it treats the leaves it is
given:

- *packing: elementwise*: each element's new value depends on that element and on scalars shared
  by all leaves (count, hyperparameters, schedules). Packed and unpacked models agree bit for bit.
- *packing: global*: one reduction over every leaf it is given (a global norm), then element-wise
  work. Packed, the same sum is added in another order: agreement to float32 rounding.
- *packing: leaf*: the rule needs each leaf's own shape or statistic (a trust ratio, a per-leaf
  norm or mean, a per-leaf noise key); every leaf that passes through it keeps its shape. Custom
  transforms are treated so.

Leaves share a buffer only when they have one dtype, at least one dimension, fewer than 1 MiB, the
same partition group and the same value of every mask on their way, and every rule they pass
through is elementwise or global.

## Row-sparse gradients (embedding tables)

A push may send the gradient of a leaf as some of its rows (`optserve.client.Rows(ids, values)`,
proto `RowSparseGradient`); rows named more than once are summed first. Under a *lazy* rule,
`lazy_adam`, `rowwise_adagrad` or `sparse_sgd` (alone, or as the rule of the leaf's `partition`
group, without a mask), only the named rows change: the server gathers them and their optimizer
state, applies the rule to them and scatters them back, so the cost follows the rows touched, not
the table, and every other row's parameters and state stay bitwise as they were. In sync mode a
round does the same with its weighted mean over the union of the rows its contributions named: rows
no contributor touched keep parameters and state bitwise, and the round sums only the rows sent,
so it too costs the rows touched; a contribution that sends the table dense makes the round touch
every row. A model over several devices does the same, each device updating the touched rows it
holds. Under **any other rule** the rows are applied
exactly as the dense gradient with the summed rows and zeros elsewhere: correct, bit for bit the
same as pushing that dense gradient, at the cost of a dense update (an adam table's untouched rows
still decay their moments). A dense gradient under a lazy rule touches every row. Lazy rules never
pack their leaves (packing: leaf below).
"""

SECTIONS = [
    ("Optimizers", lambda r: r.kind == "optimizer"),
    ("Transforms", lambda r: r.kind == "transform"),
    ("Combinators", lambda r: r.kind == "combinator" and r.library == "optax"),
    ("Schedules", lambda r: r.kind == "schedule"),
    ("Flux presets (`flux:`)", lambda r: r.library == "flux"),
    ("Axon presets (`axon:`)", lambda r: r.library == "axon"),
    ("Polaris presets (`polaris:`)", lambda r: r.library == "polaris"),
    ("objax presets (`objax:`)", lambda r: r.library == "objax"),
]


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _default(hp: HP) -> str:
    return "**required**" if hp.required else f"`{json.dumps(hp.default, ensure_ascii=False)}`"


def render_rule(rule: Rule) -> str:
    lines = [f"### `{rule.display_name or rule.name}`", ""]
    flags = [rule.kind, f"library: {rule.library}"]
    if rule.kind not in ("schedule", "combinator"):
        flags.append(f"packing: {packing_of(rule)}")
    if rule.mask:
        flags.append("mask")
    if rule.aliases:
        flags.append("aliases: " + ", ".join(f"`{a}`" for a in rule.aliases))
    lines += [rule.doc, "", "*" + "; ".join(flags) + "*", ""]
    if rule.formula:
        lines += [f"- formula: `{rule.formula}`"]
    if rule.equivalent:
        lines += [f"- equivalent: `{rule.equivalent}`"]
    if rule.tunable:
        lines += ["- tunable by default: " + ", ".join(f"`{n}`" for n in rule.tunable)]
    lines.append("")
    if rule.hyperparams:
        lines += ["| hyperparameter | type | default | meaning |", "|---|---|---|---|"]
        for hp in rule.hyperparams:
            also = f" (also `{'`, `'.join(hp.aliases)}`)" if hp.aliases else ""
            lines.append(f"| `{hp.name}`{also} | {_cell(hp.type.describe())} | {_default(hp)} | {_cell(hp.doc)} |")
        lines.append("")
    return "\n".join(lines)


def render(rules: Iterable[Rule] | None = None) -> str:
    """The whole page for the built-in rules (custom transforms excluded)."""
    rules = [r for r in (rules if rules is not None else catalog.all_rules()) if r.kind != "custom"]
    out = [INTRO]
    for title, pick in SECTIONS:
        chosen = sorted((r for r in rules if pick(r)), key=lambda r: r.name)
        if not chosen:
            continue
        out.append(f"## {title}\n")
        out.extend(render_rule(r) for r in chosen)
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
