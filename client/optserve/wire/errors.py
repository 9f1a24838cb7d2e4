"""The one error of the wire format."""

from __future__ import annotations


class WireError(ValueError):
    """A malformed tensor stream; the message names the leaf or field at fault."""
