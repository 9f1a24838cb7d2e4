"""The API layer: the only server code that speaks gRPC (service, status mapping, auth, metrics, transfer)."""
