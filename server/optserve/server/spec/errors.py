"""The one error type of the spec compiler."""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable
from typing import Any


class SpecError(ValueError):
    """An invalid optimizer spec, naming the exact field at fault.

    ``str(e) == f"{e.field}: {e.message}"``, e.g.
    ``chain[1].adamw.b1: expected a number, got "x"``. The server maps it to
    INVALID_ARGUMENT.
    """

    def __init__(self, field: str, message: str):
        self.field = field or "spec"
        self.message = message
        super().__init__(f"{self.field}: {message}")

    def __reduce__(self):  # keep pickling (multiprocessing) working
        return (SpecError, (self.field, self.message))


def show(value: Any) -> str:
    """Renders a user value for an error message, as JSON where possible."""
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def suggest(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """' (did you mean "a", "b"?)' for the closest candidates, or ''."""
    candidates = list(candidates)
    lowered = {c.lower(): c for c in candidates}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.5)
    if not close:
        return ""
    return "; did you mean " + ", ".join(f'"{lowered[c]}"' for c in close) + "?"


def join(field: str, part: str) -> str:
    """Appends a field component: join("chain[1]", "adamw") == "chain[1].adamw"."""
    if not field:
        return part
    if part.startswith("["):
        return field + part
    return f"{field}.{part}"
