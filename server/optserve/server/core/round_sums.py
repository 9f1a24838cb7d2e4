"""The weighted sum of a sync round's contributions, and its mean (core/sync.py, core/shard_rounds.py).

Every element of the sum is `sum + weight * grad` over the round's contributions in the order they
are summed, in the accumulation dtype (float32; float64 for float64 leaves); the mean divides by the
total weight. Where the sum lives depends on what the contributions sent:

- **Dense buffers** (every buffer of a rule that is not lazy, and any leaf sent whole) are summed on
  the device: one running sum per buffer, one fused jitted `sum + weight * grad` that donates it.
- **A lazy leaf sent as rows** (spec/laziness.py; core/rows.py: the distinct ids and their summed
  rows) is summed on the host at the union of the ids its contributions named (`RowSum`): a round
  costs the rows it touched, not the table. Densifying each contribution of a 1M x 64 table made a
  sync push cost 48x an async one (BENCHMARKS.md, "Sync rounds of a table (issue 16), 2026-12-03").
- The first contribution that sends such a leaf dense (it touched every row) turns the leaf's row
  sum into a dense one (zeros elsewhere), and later rows of it are densified before they are added.

The mean (`RoundMean`) gives the update its inputs (`update_inputs`): the dense means, and for each
lazy leaf still in rows its mean rows padded to a bucket with their ids (core/rows.py,
`padded_ids`), which the row step gathers and scatters (core/step.py, `make_row_step`), so rows no
contributor touched keep their parameters and optimizer state bitwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optserve.server.core.placement import ModelPlacement
from optserve.server.core.rows import padded_ids
from optserve.wire.dtypes import DTYPES, LeafSpec


def _accumulation_dtype(dtype: Any) -> Any:
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


@jax.jit
def _first(grads: dict, weight: jax.Array) -> dict:
    out = {}
    for k, g in grads.items():
        acc = _accumulation_dtype(g.dtype)
        out[k] = weight.astype(acc) * g.astype(acc)
    return out


def _fold(sums: dict, grads: dict, weight: jax.Array) -> dict:
    return {k: s + weight.astype(s.dtype) * grads[k].astype(s.dtype) for k, s in sums.items()}


_fold_jit = jax.jit(_fold, donate_argnums=(0,))


def _mean(sums: dict, total: jax.Array) -> dict:
    return {k: s / total.astype(s.dtype) for k, s in sums.items()}


_mean_jit = jax.jit(_mean, donate_argnums=(0,))


@jax.jit
def scaled(grads: dict[str, jax.Array], factor: jax.Array) -> dict[str, jax.Array]:
    """Gradients times a factor (a head clip_by_global_norm's: core/sharding.py); async pushes use it too."""
    # in float32 (a bfloat16 gradient too: the update would widen it anyway, and the unsharded model
    # clips the widened values)
    return {k: g.astype(jnp.promote_types(g.dtype, jnp.float32)) * factor for k, g in grads.items()}


@jax.jit
def _sum_sq(grads: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {k: jnp.sum(jnp.square(g.astype(jnp.float32))) for k, g in grads.items()}


def _weight(weight: float, dtype: Any) -> np.ndarray:
    """A weight as the device sums take it: rounded to float32 (jnp.float32), then widened."""
    return np.asarray(np.float32(weight), dtype)


# A lazy leaf's rows in one contribution: (distinct ids ascending, int64 [k]; their summed rows [k, ...]).
Rows = tuple[np.ndarray, np.ndarray]


@dataclasses.dataclass
class RowSum:
    """One lazy leaf's weighted sum at the union of the ids its contributions sent (ascending)."""

    ids: np.ndarray
    values: np.ndarray  # [len(ids), *row_shape], in the accumulation dtype

    @classmethod
    def first(cls, rows: Rows, weight: float, dtype: Any) -> RowSum:
        ids, values = rows
        return cls(ids, _weight(weight, dtype) * values.astype(dtype))

    def add(self, rows: Rows, weight: float) -> None:
        ids, values = rows
        dtype = self.values.dtype
        union = np.union1d(self.ids, ids)
        summed = np.zeros((len(union), *self.values.shape[1:]), dtype)
        summed[np.searchsorted(union, self.ids)] = self.values
        at = np.searchsorted(union, ids)  # distinct within one contribution
        summed[at] = summed[at] + _weight(weight, dtype) * values.astype(dtype)
        self.ids, self.values = union, summed


class RoundSum:
    """The running weighted sum of one round (module docstring). `add` in the order to sum, then
    `mean` once."""

    def __init__(self, schema: Mapping[str, LeafSpec], placement: ModelPlacement):
        self._schema, self._placement = schema, placement
        self._dense: dict[str, jax.Array] = {}
        self._rows: dict[str, RowSum] = {}
        self.total_weight = 0.0
        self.count = 0

    def wait(self) -> None:
        """Blocks until the dense sums are computed: what a contribution read from a client's
        shared-memory region needs before its reply (core/receiving.py, read_in_place)."""
        jax.block_until_ready(self._dense)

    def add(self, grads: Mapping[str, jax.Array], rows: Mapping[str, Rows], weight: float) -> None:
        """One contribution: `grads`, its buffers on the device by key (every trainable one; for the
        leaves in `rows` ignored), and `rows`, its lazy leaves sent as rows."""
        w = jnp.float32(weight)
        if self.count == 0:
            self._rows = {k: RowSum.first(r, weight, self._row_dtype(k)) for k, r in rows.items()}
            if not self._placement.sharded:
                # the weight on the model's device, so that the sums and the mean the step takes are
                # committed to it even when every gradient came as a numpy array (small ones do:
                # core/receiving.py), as the step's warm-up compiled it (core/compilation.py,
                # step_grad_avals); an uncommitted mean made the first round compile the step again
                w = jax.device_put(w, self._placement.placement.device)
            self._dense = _first({k: g for k, g in grads.items() if k not in rows}, w)
        else:
            for k in [k for k in self._rows if k not in rows]:  # sent dense now: it touched every row
                summed = self._rows.pop(k)
                self._dense[k] = self._densified(k, summed.ids, summed.values)
            incoming = {k: g for k, g in grads.items() if k in self._dense and k not in rows}
            for k, r in rows.items():
                if k in self._rows:
                    self._rows[k].add(r, weight)
                else:  # the round sums this leaf densely already
                    incoming[k] = self._densified(k, *r)
            self._dense = _fold_jit(self._dense, incoming, w)
        self.total_weight += weight
        self.count += 1

    def mean(self) -> RoundMean:
        """The weighted mean (the sum is spent)."""
        assert self.count, "a round's mean needs a contribution"
        total = self.total_weight
        dense = _mean_jit(self._dense, jnp.float32(total)) if self._dense else {}
        rows = {k: (r.ids, r.values / _weight(total, r.values.dtype)) for k, r in self._rows.items()}
        self._dense, self._rows = {}, {}
        return RoundMean(dense, rows)

    def _row_dtype(self, key: str) -> Any:
        return np.dtype(_accumulation_dtype(DTYPES[self._schema[key].dtype]))

    def _densified(self, key: str, ids: np.ndarray, values: np.ndarray) -> jax.Array:
        """Rows as the dense gradient they stand for (zeros elsewhere), on the leaf's devices."""
        dense = np.zeros(tuple(self._schema[key].shape), values.dtype)
        dense[ids] = values
        return self._placement.put(key, dense)


@dataclasses.dataclass
class RoundMean:
    """A round's weighted mean: dense buffers on the device, lazy leaves' rows on the host."""

    dense: dict[str, jax.Array]
    rows: dict[str, Rows]

    def scaled(self, factor: float) -> RoundMean:
        """Times `factor` in float32 (a head clip_by_global_norm's factor: core/sharding.py)."""
        f = np.float32(factor)
        rows = {k: (ids, v.astype(np.promote_types(v.dtype, np.float32)) * f) for k, (ids, v) in self.rows.items()}
        return RoundMean(scaled(self.dense, f) if self.dense else {}, rows)

    def squared_norm(self) -> float:
        """The squared L2 norm (each buffer's in float32, their total in float64; rows no contributor
        touched add nothing)."""
        dense = jax.device_get(_sum_sq(self.dense)) if self.dense else {}
        rows = [np.sum(np.square(v.astype(np.float32)), dtype=np.float32) for _, v in self.rows.values()]
        return float(sum(np.float64(v) for v in [*dense.values(), *rows]))

    def update_inputs(
        self, schema: Mapping[str, LeafSpec], placement: ModelPlacement
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(the update's gradients by buffer, the row ids of those given as padded rows): what
        LockedModel.apply takes."""
        grads: dict[str, Any] = dict(self.dense)
        row_ids: dict[str, np.ndarray] = {}
        for k, (ids, values) in self.rows.items():
            row_ids[k] = padded_ids(ids, schema[k].shape[0])
            padded = np.zeros((len(row_ids[k]), *values.shape[1:]), values.dtype)
            padded[: len(ids)] = values
            grads[k] = placement.put(k, padded)
        return grads, row_ids
