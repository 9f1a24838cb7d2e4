"""`Client`: a connection to a server with the calls that manage models (each one a `Model`).

    from optserve.client import Client, optim

    with Client("127.0.0.1:8470") as client:
        model = client.create_model("mlp", params, optimizer=optim.adam(1e-3))
        step = model.push(grads)
        params = model.pull()

Bulky calls (create, push, pull, push_pull, download, upload) stream chunks framed by
`optserve.wire`, so payloads are never copied by protobuf; everything else uses the generated
messages.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from optserve.client import pytree
from optserve.client.messages import schema_of, settings_message
from optserve.client.model import Model
from optserve.client.transport import Connection
from optserve.v1 import optserve_pb2 as pb
from optserve.wire.chunks import chunk_messages
from optserve.wire.framing import frame


class Client(Connection):
    """A connection to an optserve server, with the calls that create, find and delete models.

    target: "host:port". token: bearer token sent on every call. tls: True, a CA file, or
    {"ca": ..., "cert": ..., "key": ...} for mutual TLS. timeout: default deadline in seconds for
    each call (None: no deadline). chunk_bytes: payload bytes per streamed message. The channel
    itself (`call`, `stream`, `close`, `wait_ready`, `server_info`) is `transport.Connection`'s.
    """

    # -- models -----------------------------------------------------------------------------------

    def create_model(
        self,
        name: str,
        params: Any,
        optimizer: Any,
        *,
        mode: str = "async",
        workers: int | None = None,
        quorum: int | None = None,
        max_staleness: int | None = None,
        sync_timeout: float | None = None,
        staleness_scaling: str | None = None,
        ema: float | None = None,
        ema_debias: bool = False,
        reject_nonfinite: bool = False,
    ) -> Model:
        """Creates a model from initial parameters (any pytree) and an optimizer spec.

        reject_nonfinite: refuse (FailedPreconditionError, state unchanged) any update that would make
        parameters, optimizer state or EMA non-finite; each push then waits for its update to run.
        """
        leaves, structure = pytree.flatten(params)
        settings = settings_message(
            mode=mode,
            workers=workers,
            quorum=quorum,
            max_staleness=max_staleness,
            sync_timeout=sync_timeout,
            staleness_scaling=staleness_scaling,
            ema=ema,
            ema_debias=ema_debias,
            reject_nonfinite=reject_nonfinite,
        )
        header = pb.CreateModelHeader(
            name=name, optimizer_json=json.dumps(optimizer), settings=settings, schema=schema_of(leaves)
        )
        msgs = chunk_messages(pb.CreateModelRequest(header=header), leaves, self.chunk_bytes)
        info = self.call(self._create, msgs)
        return Model(self, name, structure, info)

    def model(self, name: str) -> Model:
        """A handle on an existing model (raises NotFoundError if there is none)."""
        info = self.call(self._stub.GetModel, pb.GetModelRequest(model=name))
        return Model(self, name, None, info)

    def list_models(self) -> list[dict]:
        resp = self.call(self._stub.ListModels, pb.ListModelsRequest())
        return [
            {"name": m.name, "step": m.step, "mode": m.mode, "leaves": m.leaves, "param_bytes": m.param_bytes}
            for m in resp.models
        ]

    def delete_model(self, name: str, *, delete_checkpoints: bool = False) -> None:
        self.call(self._stub.DeleteModel, pb.DeleteModelRequest(model=name, delete_checkpoints=delete_checkpoints))

    def upload(self, path: str | os.PathLike, name: str | None = None) -> Model:
        """Creates a model from a file written by `Model.download`."""
        size = os.path.getsize(path)

        def messages() -> Iterator[bytes]:
            yield pb.UploadRequest(header=pb.UploadHeader(name=name or "", total_bytes=size)).SerializeToString()
            with open(path, "rb") as f:
                offset = 0
                while chunk := f.read(self.chunk_bytes):
                    yield frame(pb.UploadRequest(offset=offset).SerializeToString(), [chunk])
                    offset += len(chunk)

        info = self.call(self._upload, messages())
        return Model(self, info.name, None, info)

    def rules(self) -> list[dict]:
        """Every rule, preset, schedule and custom transform the server knows."""
        resp = self.call(self._stub.ListRules, pb.ListRulesRequest())
        return [
            {
                "name": r.name,
                "kind": r.kind,
                "library": r.library,
                "doc": r.doc,
                "hyperparams": [
                    {
                        "name": h.name,
                        "default": json.loads(h.default_json or "null"),
                        "required": h.required,
                        "doc": h.doc,
                        "type": h.type,
                        "tunable": h.tunable,
                    }
                    for h in r.hyperparams
                ],
            }
            for r in resp.rules
        ]
