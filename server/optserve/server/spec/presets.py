"""Helpers shared by the library presets (``flux:``, ``axon:``, ``polaris:``, ``objax:``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

from optserve.server.spec.hyperparams import HP, LEARNING_RATE
from optserve.server.spec.registry import Rule, register


def lr(default: Any, doc: str = "learning rate") -> HP:
    """The learning rate with a library's default."""
    return LEARNING_RATE.replace(default=default, doc=doc)


def preset(
    library: str,
    display_name: str,
    build: Callable,
    hps: list,
    doc: str,
    formula: str,
    equivalent: str,
    *,
    unsigned: Callable | None = None,
    schedules: tuple = (),
    tunable: tuple = (),
    absent: tuple = (),
    kind: str = "preset",
) -> Rule:
    """Registers a preset; its spec name is ``display_name`` matched case-insensitively."""
    return register(
        Rule(
            name=display_name.lower(),
            kind=kind,
            library=library,
            build=build,
            hyperparams=tuple(hps),
            doc=doc,
            formula=formula,
            equivalent=equivalent,
            display_name=display_name,
            unsigned=unsigned,
            schedules=schedules,
            tunable=tunable,
            absent=tuple(absent),
        )
    )


def signed(unsigned: Callable[..., optax.GradientTransformation]) -> Callable[..., optax.GradientTransformation]:
    """Flux returns Δ and applies p ← p − Δ: the standalone rule is Δ, negated once."""

    def build(**kwargs: Any) -> optax.GradientTransformation:
        return optax.chain(unsigned(**kwargs), optax.scale(-1.0))

    return build
