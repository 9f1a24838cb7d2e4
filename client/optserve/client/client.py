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

import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from optserve.client import pytree, state_file
from optserve.client.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError, OptserveError
from optserve.client.fanout import Fanout
from optserve.client.messages import schema_of, settings_from_json, settings_message
from optserve.client.model import Model
from optserve.client.progress import PartsProgress, Progress
from optserve.client.sharded import ShardedModel
from optserve.client.tables import Init, Rows
from optserve.client.transport import Connection
from optserve.v1 import optserve_pb2 as pb
from optserve.wire import resharding
from optserve.wire.chunks import chunk_messages
from optserve.wire.errors import WireError
from optserve.wire.framing import frame
from optserve.wire.shards import Piece, ShardMap


def _rows(array: Any, piece: Piece) -> Any:
    """The piece's rows of a whole leaf (a view), or the leaf itself when the piece is all of it."""
    if array.ndim == 0 or (piece.start == 0 and piece.stop == array.shape[0]):
        return array
    return array[piece.start : piece.stop]


def _schema(leaves: Sequence[tuple[str, Any]]) -> list[pb.LeafSpec]:
    """The schema of parameters some of whose leaves are `Init` declarations."""
    return [a.spec(p) if isinstance(a, Init) else schema_of([(p, a)])[0] for p, a in leaves]


def _declared(path: str, leaf: Init, piece: Piece | None = None) -> tuple[pb.LeafSpec, pb.LeafInit]:
    """The schema entry and the declaration of an `Init` leaf (of its piece's rows on a shard)."""
    spec = leaf.spec(path)
    if piece is not None and leaf.shape:
        spec.shape[0] = piece.stop - piece.start
    return spec, leaf.message(path)


def _upload_messages(
    name: str, size: int, chunks: Iterable[bytes | memoryview], progress: Progress | None = None
) -> Iterator[bytes]:
    """An Upload stream: the header, then the file's bytes chunk by chunk with their offsets.
    progress: told (bytes handed to the stream, size) after each chunk."""
    yield pb.UploadRequest(header=pb.UploadHeader(name=name, total_bytes=size)).SerializeToString()
    offset = 0
    for chunk in chunks:
        yield frame(pb.UploadRequest(offset=offset).SerializeToString(), [chunk])
        offset += len(chunk)
        if progress is not None:
            progress(offset, size)


def _shard_file_message(path: str | os.PathLike, manifest: dict) -> str:
    where = os.fspath(path)
    try:
        found = resharding.shard_of(manifest, where)
    except WireError as e:
        return str(e)
    assert found is not None
    index, shard_map = found
    return (
        f"{where}: holds shard {index} of {shard_map.shards} of model {manifest.get('model')!r} (placement "
        f"{shard_map.model_id}), not a whole model: download the sharded model with ShardedModel.download "
        "(Client(any_shard).model(name) finds every shard) and upload that file"
    )


class Client(Connection):
    """A connection to an optserve server, with the calls that create, find and delete models.

    target: "host:port", or a list of them: the servers a model may be spread over (`create_model`
    places it over all of them, or the first `shards`; the first is the one the other calls use).
    token: bearer token sent on every call (the same for every server). tls: True, a CA file, or
    {"ca": ..., "cert": ..., "key": ...} for mutual TLS. timeout: default deadline in seconds for
    each call (None: no deadline). chunk_bytes: payload bytes per streamed message. The channel
    itself (`call`, `stream`, `close`, `wait_ready`, `server_info`) is `transport.Connection`'s.
    """

    def __init__(self, target: str | Sequence[str], **kwargs: Any):
        targets = [target] if isinstance(target, str) else list(target)
        if not targets:
            raise ValueError("target must be 'host:port' or a non-empty list of them")
        if len(set(targets)) != len(targets):
            raise ValueError(f"targets must be distinct, got {targets}")
        super().__init__(targets[0], **kwargs)
        self.targets = targets
        self._shard_connections: dict[str, Connection] = {targets[0]: self}

    def connection(self, target: str) -> Connection:
        """The connection to `target` (this client's own for its first target; others are opened
        once, with this client's settings, and closed with it)."""
        conn = self._shard_connections.get(target)
        if conn is None:
            conn = self._shard_connections[target] = self.sibling(target)
        return conn

    def close(self) -> None:
        for target, conn in list(self._shard_connections.items()):
            if conn is not self:
                conn.close()
            del self._shard_connections[target]
        super().close()

    # -- models -----------------------------------------------------------------------------------

    def create_model(
        self,
        name: str,
        params: Any,
        optimizer: Any,
        *,
        mode: str = "async",
        workers: int | None = None,
        quorum: int | float | None = None,
        max_staleness: int | None = None,
        sync_timeout: float | None = None,
        staleness_scaling: str | None = None,
        ema: float | None = None,
        ema_debias: bool = False,
        reject_nonfinite: bool = False,
        heartbeat: float | None = None,
        shards: int | None = None,
        split_bytes: int | None = None,
    ) -> Any:
        """Creates a model from initial parameters (any pytree) and an optimizer spec.

        reject_nonfinite: refuse (FailedPreconditionError, state unchanged) any update that would make
        parameters, optimizer state or EMA non-finite; each push then waits for its update to run.
        quorum: sync: a count of contributions, or a float (0, 1]: a fraction of the members a round expects.
        heartbeat: seconds between the heartbeats of idle workers; a worker's lease lasts two of them
            (docs/design.md, "Membership and leases"). None: the server's default, 5 s (a dead
            worker leaves a sync round within 10 s). 0: leases never expire (a fixed membership).
        shards: spread the model over this client's first `shards` targets (default: all of them);
            1 (or a client of one target): an ordinary `Model` on the first. Over several, a
            `ShardedModel` (docs/design.md, "Shards"): the first server places the leaves
            (PlanShards), leaves larger than `split_bytes` (default 4 MiB) split by rows.
        """
        leaves, structure = pytree.flatten(params)
        as_any: list[tuple[str, Any]] = list(leaves)  # Init leaves among the arrays (tables.py)
        for path, a in as_any:
            if isinstance(a, Rows):
                raise TypeError(f"leaf {path!r}: Rows is a gradient; parameters are arrays or Init declarations")
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
            heartbeat=heartbeat,
        )
        shards = len(self.targets) if shards is None else shards
        if not 1 <= shards <= len(self.targets):
            raise ValueError(f"shards must be between 1 and the {len(self.targets)} targets, got {shards}")
        header = pb.CreateModelHeader(
            name=name, optimizer_json=json.dumps(optimizer), settings=settings, schema=_schema(leaves)
        )
        if shards == 1:
            header.init.extend(_declared(p, a)[1] for p, a in as_any if isinstance(a, Init))
            sent = [(p, a) for p, a in leaves if not isinstance(a, Init)]
            msgs = chunk_messages(pb.CreateModelRequest(header=header), sent, self.chunk_bytes)
            return Model(self, name, structure, self.call(self._create, msgs))
        plan = pb.PlanShardsRequest(
            name=name,
            optimizer_json=header.optimizer_json,
            settings=settings,
            schema=header.schema,
            targets=self.targets[:shards],
            split_bytes=split_bytes or 0,
        )
        shard_map_msg = self.call(self._stub.PlanShards, plan)
        return self._create_shards(header, dict(leaves), shard_map_msg, structure)

    def _create_shards(
        self, header: pb.CreateModelHeader, leaves: dict[str, Any], shard_map_msg: pb.ShardMap, structure: Any
    ) -> ShardedModel:
        """Creates each shard of a placed model with its part; if any fails, deletes the shards
        already created (all or nothing) and raises the failure, naming the shard."""
        shard_map = ShardMap.from_message(shard_map_msg)
        conns = [self.connection(t) for t in shard_map.targets]
        fanout = Fanout(header.name, shard_map.targets)

        def create(i: int) -> pb.ModelInfo:
            h = pb.CreateModelHeader()
            h.CopyFrom(header)
            part = [(leaf.spec.path, p) for leaf, p in shard_map.pieces_of(i)]
            del h.schema[:]
            arrays = []
            for path, leaf_piece in part:
                leaf = leaves[path]
                if isinstance(leaf, Init):  # drawn by the shard: its rows of the whole table
                    spec, declared = _declared(path, leaf, leaf_piece)
                    h.schema.append(spec)
                    h.init.append(declared)
                    continue
                arrays.append((path, _rows(leaf, leaf_piece)))
                h.schema.extend(schema_of(arrays[-1:]))
            h.shard.CopyFrom(pb.ShardOf(map=shard_map_msg, index=i))
            msgs = chunk_messages(pb.CreateModelRequest(header=h), arrays, conns[i].chunk_bytes)
            return conns[i].call(conns[i]._create, msgs)

        try:
            infos = fanout.run(create)
        except OptserveError:
            # the creates that succeeded are found by asking: delete exactly those of this placement
            self._delete_placement(header.name, shard_map, conns)
            fanout.close()
            raise
        fanout.close()
        models = [Model(c, header.name, None, info) for c, info in zip(conns, infos, strict=True)]
        return ShardedModel(header.name, shard_map, models, structure)

    def _delete_placement(self, name: str, shard_map: ShardMap, conns: list[Connection]) -> None:
        for conn in conns:
            try:
                info = conn.call(conn._stub.GetModel, pb.GetModelRequest(model=name))
                if info.HasField("shard") and info.shard.map.model_id == shard_map.model_id:
                    conn.call(conn._stub.DeleteModel, pb.DeleteModelRequest(model=name))
            except OptserveError:
                pass  # not created there (or the server is away: nothing of it was acknowledged)

    def model(self, name: str) -> Any:
        """A handle on an existing model (raises NotFoundError if there is none): a `Model`, or a
        `ShardedModel` when the server holds one shard of a model spread over several (found through
        the shard map it keeps; every shard is asked and must hold the same placement)."""
        info = self.call(self._stub.GetModel, pb.GetModelRequest(model=name))
        if not info.HasField("shard") or len(info.shard.map.targets) == 1:
            return Model(self, name, None, info)
        return self._open_shards(name, info)

    def _open_shards(self, name: str, first: pb.ModelInfo) -> ShardedModel:
        shard_map = ShardMap.from_message(first.shard.map)
        conns = [self.connection(t) for t in shard_map.targets]
        fanout = Fanout(name, shard_map.targets)

        def get(i: int) -> pb.ModelInfo:
            info = conns[i].call(conns[i]._stub.GetModel, pb.GetModelRequest(model=name))
            s = info.shard
            if not info.HasField("shard") or s.index != i or s.map.model_id != shard_map.model_id:
                raise FailedPreconditionError(
                    f"model {name!r}: the shard map names {shard_map.targets[i]} as shard {i} of placement "
                    f"{shard_map.model_id}, but that server holds "
                    + (
                        "an unsharded model of that name"
                        if not info.HasField("shard")
                        else f"shard {s.index} of placement {s.map.model_id}"
                    )
                )
            if s.map.version != shard_map.version:
                raise FailedPreconditionError(
                    f"model {name!r}: shard {i} ({shard_map.targets[i]}) has map version {s.map.version}, "
                    f"another shard {shard_map.version} (a resharding under way?)"
                )
            return info

        try:
            infos = fanout.run(get)
        finally:
            fanout.close()
        models = [Model(c, name, None, info) for c, info in zip(conns, infos, strict=True)]
        return ShardedModel(name, shard_map, models, None)

    def list_models(self) -> list[dict]:
        resp = self.call(self._stub.ListModels, pb.ListModelsRequest())
        return [
            {"name": m.name, "step": m.step, "mode": m.mode, "leaves": m.leaves, "param_bytes": m.param_bytes}
            for m in resp.models
        ]

    def delete_model(self, name: str, *, delete_checkpoints: bool = False) -> None:
        """Deletes a model; a sharded one on every shard its map names (each shard all or nothing;
        a failure names the shard, and deleting again finishes the others)."""
        info = self.call(self._stub.GetModel, pb.GetModelRequest(model=name))
        req = pb.DeleteModelRequest(model=name, delete_checkpoints=delete_checkpoints)
        if not info.HasField("shard"):
            self.call(self._stub.DeleteModel, req)
            return
        shard_map = ShardMap.from_message(info.shard.map)
        fanout = Fanout(name, shard_map.targets)

        def delete(i: int) -> None:
            conn = self.connection(shard_map.targets[i])
            with contextlib.suppress(NotFoundError):  # deleted by an earlier, interrupted delete
                conn.call(conn._stub.DeleteModel, req)

        try:
            fanout.run(delete)
        finally:
            fanout.close()

    def upload(
        self,
        path: str | os.PathLike,
        name: str | None = None,
        *,
        shards: int | None = None,
        split_bytes: int | None = None,
        progress: Progress | None = None,
    ) -> Any:
        """Creates a model from a file written by `Model.download` or `ShardedModel.download`; it
        continues exactly where the downloaded model was, whatever the shard counts of both
        (README.md, "Sharded models").

        shards: place it over this client's first `shards` targets (default: all of them), as
            `create_model` does (PlanShards, `split_bytes`): the file is split into each shard's part
            (`optserve.wire.resharding.split`), uploaded to every shard at once, all or nothing (a
            failed shard: the others created are deleted, and the failure names the shard); returns a
            `ShardedModel`. 1, or a client of one target: the file is sent as it is to the first
            target; returns a `Model`.
        A file of one shard (a shard's own `Model.download`) is not a whole model and is refused
        (InvalidArgumentError): download the sharded model with `ShardedModel.download` instead.
        progress: called with (bytes sent, bytes to send) as the file or its parts go out
        (client/progress.py)."""
        shards = len(self.targets) if shards is None else shards
        if not 1 <= shards <= len(self.targets):
            raise ValueError(f"shards must be between 1 and the {len(self.targets)} targets, got {shards}")
        metadata = state_file.read_metadata(path)
        if metadata is not None and metadata.get("shard") is not None:
            raise InvalidArgumentError(_shard_file_message(path, metadata))
        if shards == 1:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                chunks = iter(lambda: f.read(self.chunk_bytes), b"")
                info = self.call(self._upload, _upload_messages(name or "", size, chunks, progress))
            return Model(self, info.name, None, info)
        return self._upload_shards(path, name, shards, split_bytes, progress)

    def _upload_shards(
        self,
        path: str | os.PathLike,
        name: str | None,
        shards: int,
        split_bytes: int | None,
        progress: Progress | None,
    ) -> ShardedModel:
        state = state_file.read_state(path)
        manifest = state[1]
        name = name or manifest.get("model")
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"{os.fspath(path)}: the manifest names no model; pass name=")
        try:
            plan = pb.PlanShardsRequest(
                name=name,
                optimizer_json=json.dumps(manifest["spec"]),
                settings=settings_from_json(manifest["settings"]),
                schema=[pb.LeafSpec(path=d["path"], dtype=d["dtype"], shape=d["shape"]) for d in manifest["schema"]],
                targets=self.targets[:shards],
                split_bytes=split_bytes or 0,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InvalidArgumentError(f"{os.fspath(path)}: malformed manifest ({type(e).__name__}: {e})") from None
        shard_map_msg = self.call(self._stub.PlanShards, plan)
        shard_map = ShardMap.from_message(shard_map_msg)
        try:
            parts = resharding.split(state, shard_map)
        except WireError as e:
            raise InvalidArgumentError(f"{os.fspath(path)}: {e}") from None
        conns = [self.connection(t) for t in shard_map.targets]
        fanout = Fanout(name, shard_map.targets)
        reports = None if progress is None else PartsProgress(progress, len(parts))

        def upload(i: int) -> pb.ModelInfo:
            data = memoryview(state_file.encode_state(parts[i]))
            step = conns[i].chunk_bytes
            chunks = (data[at : at + step] for at in range(0, len(data), step))
            messages = _upload_messages(name, len(data), chunks, None if reports is None else reports.part(i))
            return conns[i].call(conns[i]._upload, messages)

        try:
            infos = fanout.run(upload)
        except OptserveError:
            self._delete_placement(name, shard_map, conns)  # the shards of this placement created so far
            raise
        finally:
            fanout.close()
        models = [Model(c, name, None, info) for c, info in zip(conns, infos, strict=True)]
        return ShardedModel(name, shard_map, models, None)

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
