"""The core: settings, models, the store, the update step and aggregation; no gRPC."""
