"""Packed tensors: several leaves of one dtype back to back in one flat buffer (docs/design.md,
"Packed layouts"; the contract's `PackedTensor`).

The server keeps the leaves that its update rule treats element by element in a few flat buffers and
announces them (ModelInfo.packing); both ends then move one tensor instead of thousands. This module
is what client and server share: where each leaf lies in its pack, gathering leaves into a pack with
one copy, and viewing a pack as its leaves without any. Numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from optserve.wire.dtypes import DTYPES, LeafSpec
from optserve.wire.errors import WireError


@dataclass(frozen=True)
class Pack:
    """One packed tensor: `leaves` (with these `shapes`) back to back, each in C order.

    name: its name on the wire; never a leaf path of the model.
    dtype: the parameter dtype of all its leaves.
    """

    name: str
    dtype: str
    leaves: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    # element offset of each leaf, and one past the last: offsets[i]:offsets[i + 1] is leaf i
    offsets: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.leaves) != len(self.shapes):
            raise ValueError("a pack needs one shape per leaf")
        sizes = [math.prod(s) for s in self.shapes]
        object.__setattr__(self, "offsets", tuple(int(x) for x in np.cumsum([0, *sizes])))

    @property
    def elements(self) -> int:
        return self.offsets[-1]

    @property
    def spec(self) -> LeafSpec:
        """The pack as a leaf of the wire: its dtype, shape [elements]."""
        return LeafSpec(self.name, self.dtype, (self.elements,))

    def gather(self, arrays: Mapping[str, np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
        """The pack's leaves from `arrays` (by path; any dtype numpy can cast) copied once into one
        flat buffer, `out` when given (the pack's dtype and size); raises WireError naming a leaf of
        the wrong shape."""
        dtype = DTYPES[self.dtype]
        if out is None:
            out = np.empty(self.elements, dtype)
        for path, shape, start, end in zip(self.leaves, self.shapes, self.offsets, self.offsets[1:], strict=False):
            a = np.asarray(arrays[path])
            if a.shape != shape:
                raise WireError(f"leaf {path!r}: shape {list(a.shape)} does not match the model's {list(shape)}")
            out[start:end] = a.reshape(-1)
        return out

    def views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """The pack's leaves as views of `flat` (its elements, any dtype): no copy."""
        if flat.ndim != 1 or flat.shape[0] != self.elements:
            raise WireError(f"packed tensor {self.name!r}: {flat.shape} is not [{self.elements}]")
        return {
            path: flat[start:end].reshape(shape)
            for path, shape, start, end in zip(self.leaves, self.shapes, self.offsets, self.offsets[1:], strict=False)
        }

    def locate(self, element: int) -> tuple[str, int]:
        """The leaf holding element `element` of the pack, and the element's index in that leaf."""
        i = int(np.searchsorted(self.offsets, element, side="right")) - 1
        return self.leaves[i], element - self.offsets[i]


def packs_from_description(
    described: Sequence[tuple[str, str, Sequence[str]]], schema: Mapping[str, LeafSpec]
) -> list[Pack]:
    """Packs from (name, dtype, leaf paths) as ModelInfo.packing lists them, the shapes taken from the
    model's schema; raises WireError for a description that does not fit the schema (a leaf that is
    not in it or in two packs, a dtype that differs, a name that is a leaf path)."""
    packs, seen = [], set()
    for name, dtype, leaves in described:
        if not name or name in schema:
            raise WireError(f"packed tensor {name!r}: its name is empty or a leaf path")
        for path in leaves:
            spec = schema.get(path)
            if spec is None or path in seen or spec.dtype != dtype:
                raise WireError(f"packed tensor {name!r}: leaf {path!r} is not a {dtype} leaf of its own")
            seen.add(path)
        packs.append(Pack(name, dtype, tuple(leaves), tuple(tuple(schema[p].shape) for p in leaves)))
    return packs
