"""A model's complete state as host data and its safetensors forms; no gRPC."""
