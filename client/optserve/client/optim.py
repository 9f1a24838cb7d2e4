"""Builders for optimizer specs: plain data, identical in Python, in the proto and in checkpoints.

    optim.adam(1e-3)                       -> {"adam": {"learning_rate": 0.001}}
    optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(3e-4, weight_decay=0.01))
    optim.exponential_decay(1e-3, 1000, 0.1)   # usable wherever a number is
    optim.preset("flux:ADAM", learning_rate=0.01)

Names and hyperparameters are optax's. The server validates a spec when the model is created and
names the exact field at fault; `Client.rules()` lists every rule the server knows.
"""

from __future__ import annotations

from typing import Any

Spec = Any  # JSON-compatible: dict, str, list, numbers, bools


def rule(name: str, **hyperparams: Any) -> dict:
    """Any rule, transform or schedule by name: rule("adam", learning_rate=1e-3)."""
    return {name: {k: v for k, v in hyperparams.items() if v is not None}}


def preset(name: str, **hyperparams: Any) -> dict:
    """A preset of another library with that library's defaults: preset("flux:ADAM")."""
    return rule(name, **hyperparams)


def chain(*specs: Spec) -> dict:
    """Applies the transforms in order (optax.chain)."""
    return {"chain": list(specs)}


def _builder(name: str, *positional: str):
    def build(*args: Any, **kwargs: Any) -> dict:
        if len(args) > len(positional):
            raise TypeError(f"{name}() takes at most {len(positional)} positional arguments")
        kwargs.update(zip(positional, args))
        return rule(name, **kwargs)

    build.__name__ = name
    build.__doc__ = f"Spec for optax's `{name}`; positional arguments: {', '.join(positional) or 'none'}."
    return build


_OPTIMIZERS = [
    "sgd",
    "noisy_sgd",
    "adam",
    "nadam",
    "adamw",
    "radam",
    "adamax",
    "amsgrad",
    "adagrad",
    "adadelta",
    "rmsprop",
    "adabelief",
    "lamb",
    "lars",
    "yogi",
]
_TRANSFORMS = {
    "identity": (),
    "scale": ("step_size",),
    "scale_by_learning_rate": ("learning_rate",),
    "scale_by_schedule": ("step_size_fn",),
    "scale_by_adam": (),
    "scale_by_belief": (),
    "scale_by_radam": (),
    "scale_by_rms": (),
    "scale_by_rss": (),
    "scale_by_stddev": (),
    "scale_by_trust_ratio": (),
    "scale_by_yogi": (),
    "scale_by_amsgrad": (),
    "scale_by_adamax": (),
    "trace": ("decay",),
    "add_decayed_weights": ("weight_decay",),
    "add_noise": ("eta", "gamma", "seed"),
    "centralize": (),
    "clip": ("max_delta",),
    "clip_by_global_norm": ("max_norm",),
    "clip_by_leaf_norm": ("max_norm",),
}
_SCHEDULES = {
    "constant_schedule": ("value",),
    "exponential_decay": ("init_value", "transition_steps", "decay_rate"),
    "inverse_time_decay": ("init_value", "decay_rate"),
    "polynomial_schedule": ("init_value", "end_value", "power", "transition_steps"),
    "linear_schedule": ("init_value", "end_value", "transition_steps"),
    "cosine_decay_schedule": ("init_value", "decay_steps"),
    "warmup_cosine_decay_schedule": ("init_value", "peak_value", "warmup_steps", "decay_steps"),
    "piecewise_constant_schedule": ("init_value", "boundaries_and_scales"),
    "join_schedules": ("schedules", "boundaries"),
}

for _name in _OPTIMIZERS:
    globals()[_name] = _builder(_name, "learning_rate")
for _name, _pos in {**_TRANSFORMS, **_SCHEDULES}.items():
    globals()[_name] = _builder(_name, *_pos)
del _name, _pos

__all__ = ["rule", "preset", "chain", *_OPTIMIZERS, *_TRANSFORMS, *_SCHEDULES]
