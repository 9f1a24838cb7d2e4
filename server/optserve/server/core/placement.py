"""Where a model's buffers live: on one device, or sharded over a 1-D mesh of the server's local
devices (docs/design.md, "Devices and meshes").

With one device nothing changes: every buffer is put on it whole and the step is jitted without
shardings, exactly as before meshes existed. With N devices (`--devices`), each buffer of the
layout (core/layout.py) gets a `NamedSharding` over the mesh axis `devices`:

- a pack (1-D by construction) is split evenly along its only axis; when its elements are not a
  multiple of N it is held padded with zeros up to the next multiple (jax shards only evenly). The
  padding never leaves the device: pulls, checkpoints and the leaf form of the state stop at the
  pack's last element, gradients are padded with zeros on the way in, and the step sets padded
  parameters back to zero after each update (element-wise rules map a zero gradient of a zero
  parameter to a zero update anyway; global-norm rules then sum zeros, which changes no sum);
- a loose leaf is split along its largest axis divisible by N; a leaf with none (prime sizes,
  scalars) is replicated, whatever its size: padding a loose leaf would change what the leaf rules
  it may pass through compute over it (LAMB's norms, centralize's means);
- optimizer and EMA state follow their parameter: a state leaf of a buffer's (device) shape gets
  that buffer's sharding; everything else (counts, hyperparameters, factored statistics) is
  replicated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from optserve.server.core.layout import Layout, key_part
from optserve.wire.dtypes import DTYPES, LeafSpec

AXIS = "devices"  # the mesh's one axis


@dataclasses.dataclass(frozen=True)
class BufferPlacement:
    """One buffer of a model on the devices.

    shape: on the device (a pack's padded length); elements: a pack's real elements (None: a loose
    leaf, never padded). axis: the axis split over the mesh (None: replicated, or one device).
    """

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    elements: int | None
    axis: int | None
    sharding: jax.sharding.Sharding

    @property
    def padding(self) -> int:
        return 0 if self.elements is None else self.shape[0] - self.elements

    def describe(self, devices: int) -> str:
        """The sharding as info() prints it: 'single', 'replicated', or 'split axis 0 over 4'."""
        if devices == 1:
            return "single"
        return "replicated" if self.axis is None else f"split axis {self.axis} over {devices}"


@dataclasses.dataclass(frozen=True)
class BufferInfo:
    """What info() says of one buffer (ModelInfo.placement)."""

    name: str
    sharding: str
    param_bytes_per_device: int
    state_bytes_per_device: int
    padding: int


class Placement:
    """The devices a server's models live on: one device, or a 1-D mesh of several."""

    def __init__(self, devices: Sequence[jax.Device]):
        if not devices:
            raise ValueError("a placement needs at least one device")
        self.devices = tuple(devices)
        self.mesh = Mesh(np.array(self.devices), (AXIS,)) if len(self.devices) > 1 else None

    @property
    def device(self) -> jax.Device:
        """The first device (the only one without a mesh)."""
        return self.devices[0]

    @property
    def count(self) -> int:
        return len(self.devices)

    def replicated(self) -> jax.sharding.Sharding:
        if self.mesh is None:
            return jax.sharding.SingleDeviceSharding(self.device)
        return NamedSharding(self.mesh, PartitionSpec())

    def _split(self, ndim: int, axis: int) -> jax.sharding.Sharding:
        assert self.mesh is not None
        return NamedSharding(self.mesh, PartitionSpec(*(AXIS if i == axis else None for i in range(ndim))))

    def for_model(self, layout: Layout, schema: Sequence[LeafSpec]) -> ModelPlacement:
        """The placement of every buffer of a model's layout (module docstring)."""
        n = self.count
        out: dict[str, BufferPlacement] = {}
        for p in layout.packs:
            dtype = np.dtype(DTYPES[p.dtype])
            if n == 1:
                out[p.name] = BufferPlacement(p.name, (p.elements,), dtype, p.elements, None, self.replicated())
                continue
            padded = -(-p.elements // n) * n
            out[p.name] = BufferPlacement(p.name, (padded,), dtype, p.elements, 0, self._split(1, 0))
        by_path = {leaf.path: leaf for leaf in schema}
        for k in layout.loose:
            leaf = by_path[k]
            shape, dtype = tuple(leaf.shape), np.dtype(DTYPES[leaf.dtype])
            axis = split_axis(shape, n) if n > 1 else None
            sharding = self.replicated() if axis is None else self._split(len(shape), axis)
            out[k] = BufferPlacement(k, shape, dtype, None, axis, sharding)
        return ModelPlacement(self, out)


def split_axis(shape: tuple[int, ...], n: int) -> int | None:
    """The largest axis of `shape` divisible by `n` (the first of equal ones), or None."""
    fits = [(size, -i) for i, size in enumerate(shape) if size >= n and size % n == 0]
    return -max(fits)[1] if fits else None


class ModelPlacement:
    """One model's buffers on the placement's devices: how to put host arrays there and back."""

    def __init__(self, placement: Placement, buffers: Mapping[str, BufferPlacement]):
        self.placement = placement
        self.buffers = dict(buffers)
        self.sharded = placement.mesh is not None
        self.padded = {k: b for k, b in self.buffers.items() if b.padding}

    # -- parameters and gradients, by buffer key ---------------------------------------------------

    def put(self, key: str, array: np.ndarray, *, may_alias: bool | None = None) -> jax.Array:
        """A host array of buffer `key` (a pack unpadded) on its devices (padded there).

        A loose leaf is never padded, so an array of another shape under its key can only be the
        padded rows of a row-sparse push under a lazy rule ([bucket, *row_shape], core/rows.py):
        those go replicated, since every device gathers and scatters the rows its slice holds
        (core/step.py, `make_row_step`)."""
        if not self.sharded:
            return jax.device_put(array, self.placement.device, may_alias=may_alias)
        b = self.buffers[key]
        if b.elements is None and tuple(array.shape) != b.shape:
            return jax.device_put(array, self.placement.replicated())
        return _put_sharded(array, b.shape, b.sharding)

    def host(self, key: str, array: np.ndarray) -> np.ndarray:
        """A buffer's host copy without its padding (a view)."""
        b = self.padded.get(key)
        return array if b is None else array[: b.elements]

    def shardings(self, keys: Sequence[str]) -> dict[str, jax.sharding.Sharding]:
        return {k: self.buffers[k].sharding for k in keys}

    # -- optimizer and EMA state, by key path --------------------------------------------------------

    def _state_buffer(self, path: Sequence[str], shape: tuple[int, ...]) -> BufferPlacement | None:
        """The buffer whose sharding a state leaf follows: one named in its key path whose device
        shape (or, for a pack's host leaf, real length) the leaf has."""
        for part in path:
            b = self.buffers.get(part)
            if b is not None and (shape == b.shape or (b.elements is not None and shape == (b.elements,))):
                return b
        return None

    def state_shardings(self, tree: Any) -> Any:
        """A sharding for every leaf of a state pytree over the buffers (arrays or shapes)."""
        paths, leaves, treedef = _flatten(tree)
        out = []
        for path, x in zip(paths, leaves, strict=True):
            b = self._state_buffer(path, tuple(x.shape))
            out.append(self.placement.replicated() if b is None else b.sharding)
        return jax.tree.unflatten(treedef, out)

    def put_state(self, path: Sequence[str], array: np.ndarray) -> jax.Array:
        """One host leaf of a state's buffer form (a pack's unpadded) on its devices."""
        if not self.sharded:
            return jax.device_put(array, self.placement.device)
        b = self._state_buffer(path, tuple(array.shape))
        if b is None:
            return jax.device_put(array, self.placement.replicated())
        return _put_sharded(array, b.shape, b.sharding)

    def state_host(self, path: Sequence[str], array: np.ndarray) -> np.ndarray:
        """A state leaf's host copy without its padding."""
        for part in path:
            b = self.padded.get(part)
            if b is not None and array.shape == b.shape:
                return array[: b.elements]
        return array

    def device_bytes(self, tree: Any) -> list[int]:
        """Bytes that the arrays of `tree` hold on each device of the placement, in its order (from
        shapes and shardings: no data is read)."""
        index = {d: i for i, d in enumerate(self.placement.devices)}
        out = [0] * len(index)
        for x in jax.tree.leaves(tree):
            if isinstance(x, jax.Array):
                for device, nbytes in _held(x).items():
                    if device in index:
                        out[index[device]] += nbytes
        return out

    def describe(self, params: Mapping[str, jax.Array], states: Sequence[Any]) -> list[BufferInfo]:
        """Per buffer: its sharding, and the bytes of it and of the state following it that each
        device holding them holds (the largest share), for info()."""
        state_bytes = dict.fromkeys(self.buffers, 0)
        for tree in states:
            if tree is None:
                continue
            paths, leaves, _ = _flatten(tree)
            for path, x in zip(paths, leaves, strict=True):
                b = self._state_buffer(path, tuple(x.shape)) if isinstance(x, jax.Array) else None
                if b is not None:
                    state_bytes[b.key] += max(_held(x).values(), default=0)
        n = self.placement.count
        return [
            BufferInfo(
                k,
                b.describe(n),
                max(_held(params[k]).values(), default=0) if k in params else 0,
                state_bytes[k],
                b.padding,
            )
            for k, b in self.buffers.items()
        ]

    def zero_padding(self, params: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Inside the step: padded packs' padding set back to zero (module docstring)."""
        if not self.padded:
            return params
        out = dict(params)
        for k, b in self.padded.items():
            if k in out:
                x, real = out[k], b.shape[0] - b.padding
                out[k] = jnp.where(jnp.arange(x.shape[0]) < real, x, jnp.zeros((), x.dtype))
        return out


def _held(x: jax.Array) -> dict[jax.Device, int]:
    """Bytes of `x` on each device that holds a part of it (from its sharding: reads no data)."""
    out: dict[jax.Device, int] = {}
    for device, index in x.sharding.devices_indices_map(tuple(x.shape)).items():
        elements = math.prod(len(range(*i.indices(n))) for i, n in zip(index, x.shape, strict=True))
        out[device] = elements * x.dtype.itemsize
    return out


def _flatten(tree: Any) -> tuple[list[tuple[str, ...]], list[Any], Any]:
    flat, treedef = jax.tree.flatten_with_path(tree)
    return [tuple(key_part(k) for k in path) for path, _ in flat], [x for _, x in flat], treedef


def _put_sharded(array: np.ndarray, shape: tuple[int, ...], sharding: jax.sharding.Sharding) -> jax.Array:
    """`array` (the first `len(array)` rows of `shape`, the rest zeros) as one array of `shape`
    sharded by `sharding`: each device gets its own slice from the host (a padded pack's last
    slices are built from what is left and zeros), never the whole array first."""
    array = np.asarray(array)
    if tuple(array.shape) == tuple(shape):
        return jax.device_put(array, sharding)
    n = array.shape[0]

    def piece(index: tuple[slice, ...] | None) -> np.ndarray:
        assert index is not None  # a sharded array's every shard has its slices
        start, stop, _ = index[0].indices(shape[0])
        have = array[min(start, n) : min(stop, n)]
        if stop <= n:
            return have
        out = np.zeros((stop - start, *shape[1:]), array.dtype)
        out[: len(have)] = have
        return out

    return jax.make_array_from_callback(tuple(shape), sharding, piece)
