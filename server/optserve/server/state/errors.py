"""The error of a state file or checkpoint that cannot be used, and the helpers its messages and
checks share.

StateError is not a service error: each caller decides what it means (an upload's INVALID_ARGUMENT,
a checkpoint moved aside at restore), so the state layer stays free of status codes.
"""

from __future__ import annotations

from typing import Any


class StateError(ValueError):
    """A state file or checkpoint that cannot be used; the message names the file and the problem."""


def is_int(value: Any) -> bool:
    """Whether a value read from JSON is an integer (not a bool, not a float)."""
    return type(value) is int


def show(value: Any, limit: int = 120) -> str:
    """`repr(value)`, cut to `limit` characters: untrusted values in messages stay short."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
