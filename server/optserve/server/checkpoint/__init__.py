"""Checkpoints on disk: the atomic format and the manager that saves, restores and prunes; no gRPC."""
