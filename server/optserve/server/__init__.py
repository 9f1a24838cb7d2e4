"""optserve server: models on a JAX device behind gRPC, updated by jit-compiled optax rules.

`Server` runs one inside the current process; `optserve serve` runs one as a program. The import
is lazy so that the command line and the demo's worker processes start without loading jax.
"""

from typing import Any

__all__ = ["Server"]


def __getattr__(name: str) -> Any:
    if name == "Server":
        from optserve.server.server import Server

        return Server
    raise AttributeError(name)
