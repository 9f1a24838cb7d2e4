"""`create_or_attach`: the model of that name, created by whichever of several workers comes first.

Workers that start together (the drop-ins' processes, README.md, "PyTorch") each try to create the
model; all but one are refused with ALREADY_EXISTS. The name is reserved before the model is
registered (docs/design.md, "Models and admission"), so for a moment the refused ones can find it
neither to create nor to open: they ask again until it is registered.
"""

from __future__ import annotations

import time
from typing import Any

from optserve.client.client import Client
from optserve.client.errors import AlreadyExistsError, NotFoundError


def create_or_attach(
    client: Client, name: str, params: Any, optimizer: Any, create_options: dict[str, Any], wait: float = 60.0
) -> tuple[Any, bool]:
    """(the model, whether this call created it). optimizer None: the model must exist
    (NotFoundError). A model another worker is creating is waited for up to `wait` seconds (then
    the NotFoundError is raised)."""
    if optimizer is None:
        return client.model(name), False
    try:
        return client.create_model(name, params, optimizer, **create_options), True
    except AlreadyExistsError:
        pass
    deadline = time.monotonic() + wait
    while True:
        try:
            return client.model(name), False
        except NotFoundError:  # reserved by a create still under way, or deleted meanwhile
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
