"""Leaf-path globs for masks and partitions.

``*`` matches within one path component, ``**`` any number of components
(including none), ``?`` one character, ``[...]`` a character class. In a list,
patterns apply in order and a ``!pattern`` removes the leaves it matches, so
``["**", "!**/bias", "!**/scale"]`` is "every leaf except biases and norm
scales". A list that starts with an exclusion starts from every leaf.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from optserve.server.spec.errors import SpecError, join


@functools.lru_cache(maxsize=1024)
def glob_regex(pattern: str) -> re.Pattern:
    """Compiles a leaf-path glob to a regex matching whole paths."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):  # "**/" : any leading components, or none
                out.append("(?:.*/)?")
                i += 1
            else:
                out.append(".*")
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def select(globs: Sequence[str], leaves: Sequence[str], field: str) -> set[str]:
    """The leaves the glob list selects; SpecError if a pattern is useless.

    A positive pattern that matches no leaf, or a list that selects nothing, is
    an error: it is almost always a typo, and it would silently change nothing.
    """
    chosen: set[str] = set() if not globs[0].startswith("!") else set(leaves)
    for i, pattern in enumerate(globs):
        negate = pattern.startswith("!")
        regex = glob_regex(pattern[1:] if negate else pattern)
        hits = {leaf for leaf in leaves if regex.match(leaf)}
        if not negate and not hits:
            where = join(field, f"[{i}]") if len(globs) > 1 else field
            raise SpecError(where, f'glob "{pattern}" matches no leaf{_sample(leaves)}')
        chosen = chosen - hits if negate else chosen | hits
    if not chosen:
        raise SpecError(field, f"mask matches no leaf{_sample(leaves)}")
    return chosen


def _sample(leaves: Sequence[str]) -> str:
    if not leaves:
        return " (there are no leaves)"
    shown = ", ".join(leaves[:5])
    more = f", ... ({len(leaves)} leaves)" if len(leaves) > 5 else ""
    return f" (leaves: {shown}{more})"
