"""`remote(client, name, optimizer=spec)`: an optax `GradientTransformation` look-alike whose update
rule runs on an optserve server.

optax code does `updates, state = tx.update(grads, state, params)` and then
`params = optax.apply_updates(params, updates)`. Here `update` pushes the gradients and pulls the
server's parameters in one round trip (`Worker.push_pull`) and returns `new - params` as the
updates, so that `apply_updates` gives the server's parameters (to within one float32 rounding of
the subtraction and addition); `step(tx, params, grads)` returns them exactly. The optimizer's state
lives on the server; the `RemoteState` optax threads through holds only the step it was at.

It runs outside `jax.jit`: a push is I/O, which a traced function cannot do. Jit the loss and
gradient computation, and call `update` on the concrete gradients it returns; called under a trace,
`update` raises a TypeError that says so.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np

from optserve.client import Client
from optserve.client.attach import create_or_attach
from optserve.client.worker import Worker


class RemoteState(NamedTuple):
    """What optax threads from one `update` to the next: the server step of the last update
    (-1 before the first). The optimizer's own state (moments, counts) is on the server."""

    step: int


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


class _Flat:
    """A pytree's leaves under names ("params.Dense_0.kernel") and its treedef, to rebuild it."""

    def __init__(self, tree: Any):
        with_path, self.treedef = jax.tree_util.tree_flatten_with_path(tree)
        names = [".".join(_key_name(k) for k in path) or "leaf" for path, _ in with_path]
        if len(set(names)) != len(names):  # keys with dots in them: jax's own spelling is unique
            names = [jax.tree_util.keystr(path) for path, _ in with_path]
        self.names = names

    def leaves(self, tree: Any, what: str) -> list[Any]:
        """The leaves of `tree`, which must have the parameters' structure and hold concrete arrays."""
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        if cast(Any, treedef) != self.treedef:
            raise ValueError(f"the {what} do not have the structure of the parameters: {treedef} vs {self.treedef}")
        for name, leaf in zip(self.names, leaves, strict=True):
            if isinstance(leaf, jax.core.Tracer):
                raise TypeError(
                    f"optserve.jax: {what} leaf {name!r} is a jax tracer: the remote update cannot run inside "
                    "jax.jit (or grad, vmap, scan). Jit the loss and gradients only, and call tx.update (or "
                    "optserve.jax.step) outside, on the arrays they return."
                )
        return leaves

    def arrays(self, tree: Any, what: str) -> dict[str, np.ndarray]:
        """The leaves of `tree` on the host by name (no copy for arrays already there)."""
        return {n: np.asarray(leaf) for n, leaf in zip(self.names, self.leaves(tree, what), strict=True)}


class RemoteTransformation:
    """`init(params) -> state` and `update(grads, state, params) -> (updates, state)`, as optax's
    `GradientTransformation`; made by `remote`. `step(params, grads)` returns the new parameters."""

    def __init__(self, client: Client, name: str, optimizer: Any, worker_id: str | None, create_options: dict):
        self.client, self.name, self.optimizer = client, name, optimizer
        self.create_options = create_options
        self.worker_id = worker_id or f"jax-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.worker: Worker | None = None
        self._flat: _Flat | None = None

    def __repr__(self) -> str:
        return f"optserve.jax.remote({self.name!r} at {self.client.target})"

    def init(self, params: Any) -> RemoteState:
        """Creates the model from `params` (or, when it exists, attaches to it: the first update
        then moves `params` to the server's parameters)."""
        self._flat = _Flat(params)
        arrays = self._flat.arrays(params, "parameters")
        model = create_or_attach(self.client, self.name, arrays, self.optimizer, self.create_options)[0]
        self.worker = model.worker(self.worker_id)
        self.worker.pull()  # the step the first push is computed against
        return RemoteState(step=model.last_step)

    def _push_pull(self, grads: Any, params: Any) -> tuple[Any, int]:
        if self.worker is None or self._flat is None:
            raise RuntimeError(f"model {self.name!r}: call init(params) before update")
        arrays = self._flat.arrays(grads, "gradients")
        self._flat.leaves(params, "parameters")  # the same structure, and not traced
        # fresh arrays each time: jnp.asarray may alias a numpy array on CPU, so an out= reused
        # across calls would change parameters the caller already holds
        pulled = self.worker.push_pull(arrays)
        new = [jnp.asarray(pulled[n]) for n in self._flat.names]
        return jax.tree_util.tree_unflatten(self._flat.treedef, new), self.worker.model.last_step

    def update(self, grads: Any, state: RemoteState, params: Any = None) -> tuple[Any, RemoteState]:
        """Pushes `grads`, returns (server's parameters - params, state): optax.apply_updates(params,
        updates) then holds the server's parameters."""
        if params is None:
            raise ValueError(f"model {self.name!r}: update needs params (the updates are new params - params)")
        new, step = self._push_pull(grads, params)
        updates = jax.tree_util.tree_map(lambda n, p: (n - p).astype(jnp.asarray(p).dtype), new, params)
        return updates, RemoteState(step=step)

    def pull(self, like: Any) -> Any:
        """The server's parameters in the structure of `like` (evaluation, a worker joining late)."""
        flat = _Flat(like)
        pulled = self.client.model(self.name).pull()
        missing = sorted(set(flat.names) - set(pulled))
        if missing:
            raise ValueError(f"model {self.name!r} has no leaf {missing[0]!r} (it has {sorted(pulled)[:8]})")
        return jax.tree_util.tree_unflatten(flat.treedef, [jnp.asarray(pulled[n]) for n in flat.names])

    def step(self, params: Any, grads: Any) -> Any:
        """Pushes `grads`, returns the server's parameters after the update (exactly)."""
        return self._push_pull(grads, params)[0]

    def close(self) -> None:
        """Stops this process's worker heartbeat (Worker.close): its lease then expires unless it
        pushes again. Call it (or use `with`) before closing the client, so that no heartbeat is in
        flight on a channel being closed while the process exits."""
        if self.worker is not None:
            self.worker.close()

    def __enter__(self) -> RemoteTransformation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remote(
    client: Client, name: str, optimizer: Any = None, *, worker_id: str | None = None, **create_options: Any
) -> RemoteTransformation:
    """An optax-style transformation whose update runs on the server's model `name`.

    optimizer: the spec the model is created with by `init` (None: the model must exist).
    create_options: `Client.create_model`'s keywords (mode="sync", workers=, ...), used only when
    `init` creates the model. worker_id: this process's worker id (retried pushes apply once)."""
    return RemoteTransformation(client, name, optimizer, worker_id, create_options)


def step(tx: RemoteTransformation, params: Any, grads: Any) -> Any:
    """The new parameters after the server applies `grads`: `tx.step(params, grads)`."""
    return tx.step(params, grads)
