"""The model store: the server's named models (multi-tenant), created and deleted atomically.

Models come in through core/admission.py only, which checks the limits kept here before anything is
allocated and reserves the name and bytes while the model is built."""

from __future__ import annotations

import contextlib
import os
import re
import threading

import jax

from optserve.server.core.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from optserve.server.core.model import Model
from optserve.server.core.placement import Placement

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


def check_model_name(name: str) -> str:
    """Model names are also directory names for checkpoints: keep them plain."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidArgument(
            f"model name {name!r}: use 1-128 characters of letters, digits, '.', '_' and '-', "
            "not starting with '.' or '-'"
        )
    return name


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class ModelStore:
    """Name -> Model. Limits (max models, bytes) are checked before anything is allocated."""

    def __init__(
        self,
        device: jax.Device | Placement,
        *,
        max_models: int | None = None,
        max_model_bytes: int | None = None,
        max_total_bytes: int | None = None,
        packed: bool = True,
    ):
        """device: the device models live on, or the devices (a mesh: core/placement.py).
        packed: models hold their alike small leaves in flat buffers (core/layout.py)."""
        self.placement = device if isinstance(device, Placement) else Placement([device])
        self.device = self.placement.device  # the first (the only one without a mesh)
        self.packed = packed
        self.max_models = max_models
        self.max_model_bytes = max_model_bytes
        self.max_total_bytes = max_total_bytes
        self._models: dict[str, Model] = {}
        self._reserved: dict[str, int] = {}  # name -> bytes claimed while its parameters stream in
        self._lock = threading.Lock()

    def get(self, name: str) -> Model:
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"model {name!r} not found")
        return model

    def names(self) -> list[str]:
        return sorted(self._models)

    def models(self) -> list[Model]:
        return [self._models[n] for n in self.names()]

    def total_bytes(self) -> int:
        """Parameters and optimizer state of every model, plus what creates in flight have claimed."""
        return sum(m.param_bytes + m.state_bytes for m in list(self._models.values())) + sum(self._reserved.values())

    def capacity_bytes(self) -> int:
        """What the devices can hold at most: their memory limits where they report them, else host
        memory (fake CPU devices of one host share it)."""
        limits: list[int] = []
        with contextlib.suppress(Exception):  # backends without memory_stats
            limits = [int((d.memory_stats() or {}).get("bytes_limit") or 0) for d in self.placement.devices]
        return sum(limits) if limits and all(limits) else host_memory_bytes()

    def check_can_create(self, name: str, declared_bytes: int) -> None:
        """Raises before any bytes are received if the model could not be created."""
        check_model_name(name)
        if name in self._models or name in self._reserved:
            raise AlreadyExists(f"model {name!r} already exists")
        if self.max_models is not None and len(self._models) + len(self._reserved) >= self.max_models:
            raise ResourceExhausted(f"model {name!r}: the server already holds its limit of {self.max_models} models")
        if self.max_model_bytes is not None and declared_bytes > self.max_model_bytes:
            raise ResourceExhausted(
                f"model {name!r}: {declared_bytes} bytes of parameters and optimizer state exceed the per-model "
                f"limit of {self.max_model_bytes}"
            )
        if declared_bytes > self.capacity_bytes():  # without a configured limit: never try the impossible
            raise ResourceExhausted(
                f"model {name!r}: {declared_bytes} bytes declared, more than the {self.capacity_bytes()} bytes of "
                f"memory of {self.describe_devices()}"
            )
        if self.max_total_bytes is not None and self.total_bytes() + declared_bytes > self.max_total_bytes:
            raise ResourceExhausted(
                f"model {name!r}: {declared_bytes} more bytes would exceed the server's limit of {self.max_total_bytes}"
            )

    def device_bytes(self) -> list[int]:
        """Bytes of every model held on each device, in the placement's order."""
        out = [0] * self.placement.count
        for m in self.models():
            for i, n in enumerate(m.placement_info()[1]):
                out[i] += n
        return out

    def describe_devices(self) -> str:
        """'device TFRT_CPU_0', or 'devices gpu:0-3' for a mesh (in messages and logs)."""
        devices = self.placement.devices
        if len(devices) == 1:
            return f"device {devices[0]}"
        return f"{len(devices)} {devices[0].platform} devices ({', '.join(str(d.id) for d in devices)})"

    def reserve(self, name: str, declared_bytes: int) -> None:
        """Claims a name while its parameters stream in, so two creates cannot both succeed."""
        with self._lock:
            self.check_can_create(name, declared_bytes)
            self._reserved[name] = declared_bytes

    def release(self, name: str) -> None:
        with self._lock:
            self._reserved.pop(name, None)

    def add(self, model: Model) -> None:
        """Registers a model built under a reservation of its name (core/admission.py)."""
        with self._lock:
            self._reserved.pop(model.name, None)
            if model.name in self._models:
                raise AlreadyExists(f"model {model.name!r} already exists")
            self._models[model.name] = model

    def delete(self, name: str) -> Model:
        with self._lock:
            model = self._models.pop(name, None)
        if model is None:
            raise NotFound(f"model {name!r} not found")
        model.mark_deleted()
        return model
