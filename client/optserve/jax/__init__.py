"""optserve for JAX and optax: `remote`, an optax-style transformation whose update runs on a server,
and `step`, the same as one call returning the new parameters.

Importing this package imports jax (`optserve[jax]`); `optserve.client` never does.
README.md, "JAX and optax", has the one-line change and the pitfalls.
"""

from optserve.jax.transformation import RemoteState, RemoteTransformation, remote, step

__all__ = ["RemoteState", "RemoteTransformation", "remote", "step"]
