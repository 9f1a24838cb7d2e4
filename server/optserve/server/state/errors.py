"""The error of the state layer: a state that cannot be used."""
from __future__ import annotations


class StateError(ValueError):
    """A state file or checkpoint that cannot be used; the message names the file and the problem."""
