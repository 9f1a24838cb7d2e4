"""`RemoteOptimizer`: `loss.backward(); optimizer.step()` with the update applied by an optserve server.

`step()` pushes every parameter's `.grad` and writes the parameters the server answers with back
into the same tensors, in place, in one round trip (`Worker.push_pull(out=...)`): the module, its
hooks and anything else holding the tensors see the new values, and no tensor is created. The
optimizer's state (moments, step count) lives on the server only; `state_dict` names a server
checkpoint of it (or carries a download of it), and `load_state_dict` brings the server back to it.

What is pushed: the gradient of every parameter given, every step. A parameter whose `.grad` is
None in a step (frozen, or unused by that step's forward) is pushed as zeros, because a push carries
every leaf of the model; the server's rule then sees a zero gradient (Adam or SGD leave a parameter
that never had a gradient unchanged; one that had some keeps moving by its momentum, and weight
decay still applies). Leave parameters that are never trained out of the optimizer.
"""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from optserve.client import Client
from optserve.client.attach import create_or_attach
from optserve.client.worker import Worker
from optserve.torch.buffers import HostMirror, numpy_view, synchronize

StateMode = str  # "checkpoint" or "download"


def _named(params: Iterable[Any]) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs from `module.named_parameters()`, tensors (named by position: "0", "1",
    ...), or torch's param groups ({"params": [...]}; their other options are not used: the
    server's spec is the optimizer)."""
    items: list[Any] = []
    for item in params:
        items += list(item["params"]) if isinstance(item, dict) else [item]
    named: list[tuple[str, torch.Tensor]] = []
    for i, item in enumerate(items):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            named.append((item[0], item[1]))
        elif isinstance(item, torch.Tensor):
            named.append((str(i), item))
        else:
            raise TypeError(f"expected tensors or (name, tensor) pairs, got {type(item).__name__} at position {i}")
    names = [n for n, _ in named]
    if not named:
        raise ValueError("RemoteOptimizer got an empty parameter list")
    if len(set(names)) != len(names):
        raise ValueError(f"two parameters have the same name: {sorted(n for n in names if names.count(n) > 1)[0]!r}")
    if len({id(t) for _, t in named}) != len(named):
        raise ValueError("a parameter appears twice")
    return named


class RemoteOptimizer(torch.optim.Optimizer):
    """A torch optimizer whose update rule runs on an optserve server.

    params: `module.named_parameters()` (the names become the model's leaf paths) or tensors.
    client: an `optserve.client.Client`. name: the model's name on the server.
    optimizer: an optimizer spec (`"adam"`-style JSON data, `optserve.client.optim`): the model is
        created from the tensors' current values if it does not exist; if it does (another worker
        created it, or a restart), the tensors are overwritten with the server's parameters. None:
        the model must exist.
    worker_id: this process's worker id (default: host, pid and a random suffix); retried pushes
        are applied once under it. wire_dtype: send gradients and receive parameters narrowed
        ("bfloat16", "float16"). state: what `state_dict()` does, "checkpoint" (a server checkpoint:
        needs `--checkpoint-dir`) or "download" (the model's whole state in the dict, as bytes).
    create_options: `Client.create_model`'s keywords (mode="sync", workers=, quorum=, ...), used
        only when this call creates the model.
    """

    def __init__(
        self,
        params: Iterable[Any],
        client: Client,
        name: str,
        optimizer: Any = None,
        *,
        worker_id: str | None = None,
        wire_dtype: str | None = None,
        state: StateMode = "checkpoint",
        **create_options: Any,
    ):
        named = _named(params)
        if state not in ("checkpoint", "download"):
            raise ValueError(f"state must be 'checkpoint' or 'download', got {state!r}")
        super().__init__([t for _, t in named], {})
        self.client, self.name, self.wire_dtype, self.state_mode = client, name, wire_dtype, state
        self.names = [n for n, _ in named]
        self.tensors = [t for _, t in named]
        self.model = self._open(optimizer, create_options)
        worker_id = worker_id or f"torch-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.worker: Worker = self.model.worker(worker_id)
        self._params = [HostMirror(t) for t in self.tensors]
        self._grads: list[HostMirror | None] = [None] * len(self.tensors)  # staging of gradients not on the CPU
        self._zeros: dict[int, np.ndarray] = {}
        self._out_arrays: dict[str, np.ndarray] | None = None
        self._staged: list[tuple[HostMirror, torch.Tensor]] = []
        self.last_step = -1
        self.pull()

    def _open(self, optimizer: Any, create_options: dict[str, Any]) -> Any:
        initial = {}
        if optimizer is not None:
            for n, t in zip(self.names, self.tensors, strict=True):
                view = numpy_view(t)
                initial[n] = view if view is not None else t.detach().cpu().numpy()
        # exists already (another worker created it): the tensors take the server's parameters
        return create_or_attach(self.client, self.name, initial, optimizer, create_options)[0]

    def __repr__(self) -> str:
        return f"RemoteOptimizer(model={self.name!r} at {self.client.target}, {len(self.tensors)} parameters)"

    # -- the data path ----------------------------------------------------------------------------

    def _out(self) -> dict[str, np.ndarray]:
        """The host arrays pulls write into, the same dict from step to step while no parameter's
        memory moved (one that did, `p.data = ...`, gets a new mirror)."""
        changed = self._out_arrays is None
        for i, t in enumerate(self.tensors):
            if not self._params[i].fits(t):
                self._params[i] = HostMirror(t)
                changed = True
        if changed or self._out_arrays is None:
            self._out_arrays = {n: m.array for n, m in zip(self.names, self._params, strict=True)}
            self._staged = [(m, t) for m, t in zip(self._params, self.tensors, strict=True) if m.stage is not None]
        return self._out_arrays

    def _written_back(self) -> None:
        """Copies the pulled parameters of tensors that are not their own host arrays (CUDA)."""
        if self._staged:
            with torch.no_grad():
                for m, t in self._staged:
                    m.to_device(t)

    def pull(self) -> None:
        """Overwrites the parameters with the server's (the constructor does it once)."""
        out = self._out()
        if self._staged:  # a copy of the last pull from the staging buffers may still be running
            synchronize(self.tensors)
        self.worker.pull(out=out, wire_dtype=self.wire_dtype)
        self.last_step = self.model.last_step
        self._written_back()

    def _gradients(self) -> dict[str, np.ndarray]:
        grads: dict[str, np.ndarray] = {}
        for i, (n, t) in enumerate(zip(self.names, self.tensors, strict=True)):
            g = t.grad
            if g is None:
                zero = self._zeros.get(i)
                if zero is None:
                    zero = self._zeros[i] = np.zeros(self._params[i].array.shape, self._params[i].array.dtype)
                grads[n] = zero
                continue
            view = numpy_view(g)
            if view is None:
                stage = self._grads[i]
                if stage is None or not stage.fits(g):
                    stage = self._grads[i] = HostMirror(g)
                view = stage.from_device(g)
            grads[n] = view
        if self._staged:
            synchronize(t.grad for t in self.tensors if t.grad is not None)
        return grads

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Pushes the gradients and writes the updated parameters into the tensors (one round trip;
        in sync mode it returns once the round this push joined is applied)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        out = self._out()
        self.worker.push_pull(self._gradients(), out=out, wire_dtype=self.wire_dtype)
        self.last_step = self.model.last_step
        self._written_back()
        return loss

    # -- state ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stops this process's worker heartbeat (Worker.close): its lease then expires unless it
        pushes again. Call it (or use `with`) before closing the client."""
        self.worker.close()

    def __enter__(self) -> RemoteOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """A reference to the optimizer's state on the server, with `torch.save`-able values: with
        state="checkpoint" a checkpoint taken now (its step), with state="download" the model's
        whole state file (parameters, optimizer state, worker records) as bytes."""
        meta: dict[str, Any] = {"model": self.name, "names": list(self.names)}
        if self.state_mode == "checkpoint":
            meta["checkpoint_step"] = self.model.save()
        else:
            with tempfile.TemporaryDirectory(prefix="optserve-state-") as d:
                path = os.path.join(d, "state.safetensors")
                self.model.download(path)
                with open(path, "rb") as f:
                    meta["file"] = f.read()
        return {"state": {}, "param_groups": [{"params": list(range(len(self.tensors)))}], "optserve": meta}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Brings the server's model back to a `state_dict()` of this model and pulls its parameters
        into the tensors: a checkpoint is restored (`Model.restore`), a downloaded state replaces the
        model (deleted, then uploaded: other workers' calls meanwhile fail with NOT_FOUND)."""
        meta = state_dict.get("optserve")
        if not isinstance(meta, dict):
            raise ValueError(
                f"model {self.name!r}: not a RemoteOptimizer state_dict (a torch.optim optimizer's state "
                "cannot be loaded into a remote one: create the model from the trained parameters instead)"
            )
        if meta.get("model") != self.name or meta.get("names") != self.names:
            raise ValueError(
                f"model {self.name!r}: the state_dict is of model {meta.get('model')!r} with parameters "
                f"{meta.get('names')}, this optimizer has {self.names}"
            )
        if "checkpoint_step" in meta:
            self.model.restore(int(meta["checkpoint_step"]))
        else:
            with tempfile.TemporaryDirectory(prefix="optserve-state-") as d:
                path = os.path.join(d, "state.safetensors")
                with open(path, "wb") as f:
                    f.write(meta["file"])
                self.client.delete_model(self.name)
                self.model = self.client.upload(path, self.name)
                # the uploaded state remembers this worker's seqs up to the download's: go on after ours
                # (the old Worker's heartbeat stops: it renewed a model that is gone)
                self.worker.close()
                self.worker = self.model.worker(self.worker.worker_id, first_seq=self.worker.seq + 1)
        self.pull()
