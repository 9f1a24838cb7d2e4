"""The shared-memory spans of push and pull requests (docs/design.md, "Shared memory").

A push's span stands in for its first message's payload; a pull's span is where the reply's
tensors are written. Every span is resolved through the caller's session (core/shared_memory.py:
PERMISSION_DENIED for another's key or region, INVALID_ARGUMENT for a range outside the region) and
checked against what it must hold, naming the model and the leaf, before anything is applied.
"""

from __future__ import annotations

import numpy as np

from optserve.server.core import pulls
from optserve.server.core.errors import FailedPrecondition, InvalidArgument
from optserve.server.core.model import Model
from optserve.server.core.shared_memory import SharedRegions
from optserve.v1 import optserve_pb2 as pb
from optserve.wire.chunks import WireLeaf
from optserve.wire.errors import WireError
from optserve.wire.shared_memory import slices_fit, write_leaves


def resolve(shared: SharedRegions | None, span: pb.SharedMemorySpan, model: Model) -> np.ndarray:
    """The flat uint8 view of `span`, or the refusal."""
    if shared is None:
        raise FailedPrecondition(
            f"model {model.name!r}: this server offers no shared memory (optserve serve --shared-memory); "
            "use the byte stream"
        )
    return shared.span(span.session, span.region, span.offset, span.length, model.name)


def push_payload(
    shared: SharedRegions | None, span: pb.SharedMemorySpan, first: pb.PushRequest, payload: memoryview, model: Model
) -> memoryview:
    """The push's bytes in its region, in place of the first message's (empty) payload. The push owns
    them until its reply: the receiver checks NaN and Inf where they lie and the update reads them
    in place (core/receiving.py, read_in_place), finished before the reply."""
    if len(payload):
        raise InvalidArgument(f"model {model.name!r}: a push with shared_memory must carry no payload")
    view = resolve(shared, span, model)
    try:
        slices_fit(first.slices, len(view), f"model {model.name!r}")
    except WireError as e:
        raise InvalidArgument(str(e)) from None
    return view[: sum(int(s.length) for s in first.slices)].data


def check_pull(shared: SharedRegions | None, model: Model, req: pb.PullRequest) -> None:
    """A pull's span must hold every tensor in the requested wire dtype (checked before it waits or,
    in a PushPull, before its push is applied)."""
    view = resolve(shared, req.shared_memory, model)
    past = pulls.first_leaf_past(model.schema, req.wire_dtype, len(view))
    if past is not None:
        raise InvalidArgument(
            f"model {model.name!r}: leaf {past[0]!r} does not fit in the shared-memory span: the parameters "
            f"need {past[1]} bytes up to it, the span has {len(view)}"
        )


def pull_reply(
    shared: SharedRegions | None, model: Model, req: pb.PullRequest, first: pb.PullResponse, leaves: list[WireLeaf]
) -> bytes:
    """Writes a pull's tensors into the request's span; the one reply message describing them."""
    view = resolve(shared, req.shared_memory, model)
    try:
        slices = write_leaves(leaves, view, f"model {model.name!r}")
    except WireError as e:
        raise InvalidArgument(str(e)) from None
    first.header.shared_memory = True
    first.slices.extend(
        pb.TensorSlice(path=s.path, dtype=s.dtype, shape=s.shape, offset=s.offset, length=s.length) for s in slices
    )
    return first.SerializeToString()
