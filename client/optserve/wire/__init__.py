"""The wire format, numpy only: the one package the client and the server share.

- `dtypes`: the dtypes a tensor may have on the wire, their names and sizes, `LeafSpec`.
- `framing`: payload-last messages built and split without protobuf copying the payload.
- `chunks`: splitting leaves into chunks (`plan_chunks`) and framing them (`chunk_messages`).
- `assembler`: `TensorAssembler`, received slices into aligned buffers, every offset validated.
- `channel`: the gRPC settings both sides agree on (message caps, keepalive, the service name).
- `errors`: `WireError`, a malformed stream.

Nothing here imports grpc, protobuf or the generated `optserve.v1` modules: message objects are
handled by duck typing (`slices`, `SerializeToString`, `FromString`, `DESCRIPTOR`).
"""
